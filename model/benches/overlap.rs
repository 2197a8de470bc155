//! Issue #9: what offloading costs. One FPDT training step (forward,
//! backward, the AdamW step) of a small GPT on one cpu device, with its
//! chunks offloaded to the host arena and prefetched back (double-buffered)
//! against the same step with everything resident, at chunk sizes from 1K
//! tokens up; and the share of the copy streams' busy time that ran while
//! the compute stream was busy too (copies hidden behind compute), read from
//! the device's trace. The measuring is `fpdt_model::bench::overlap` (also
//! `fpdt bench overlap`); this binary runs its defaults.
//!
//! The sweep stops when the next chunk size would take the run past its
//! time budget (`FPDT_OVERLAP_BUDGET_S`, default 120 s), and says so.

use std::time::Duration;

use fpdt_model::bench::overlap::{self, OverlapOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut opts = OverlapOptions::default();
    if let Some(s) = std::env::var("FPDT_OVERLAP_BUDGET_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
    {
        opts.budget = Duration::from_secs_f64(s);
    }
    let report = overlap::run(&opts, &mut |m| eprintln!("overlap: {m}"))?;
    print!("{}", overlap::render(&report));
    Ok(())
}
