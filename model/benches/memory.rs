//! Peak device memory of one training step against sequence length, at a
//! fixed chunk size, for FPDT (offload + checkpointing) and the Ulysses
//! baseline (one chunk, nothing offloaded), measured on the meta device from
//! the allocator's logical ledger. Prints a table. The measuring is
//! `fpdt_model::bench::memory` (also `fpdt bench memory`); this binary runs
//! its defaults: 4 layers of gpt2-124m, P = 4, C = 4096, S = 8K .. 64K.

use fpdt_model::bench::memory::{self, MemoryOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = MemoryOptions::gpt2_4_layers()?;
    let report = memory::run(&opts, &mut |m| eprintln!("memory: {m}"))?;
    print!("{}", memory::render(&report));
    Ok(())
}
