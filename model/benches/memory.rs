//! Peak device memory of one training step against sequence length, at a
//! fixed chunk size, for FPDT (offload + checkpointing) and the Ulysses
//! baseline (one chunk, nothing offloaded), measured on the meta device from
//! the allocator's logical ledger. Prints a table.

#[path = "../../benches/support/mod.rs"]
mod support;

use fpdt_model::{FpdtGroup, ModelConfig, Schedule};
use fpdt_runtime::{fmt_bytes, MetaConfig, Space};

fn peak(cfg: &ModelConfig, sched: Schedule) -> Result<usize, fpdt_model::ModelError> {
    let meta = MetaConfig {
        device_memory: 1 << 40,
        host_memory: 1 << 44,
        ..MetaConfig::default()
    };
    let mut g = FpdtGroup::meta(cfg, sched, &meta)?;
    let tokens = vec![0u32; sched.seq_len];
    let targets = vec![1i32; sched.seq_len];
    g.forward_backward(&tokens, &targets)?;
    Ok(g.ranks()[0].device().ledger().usage(Space::Device).peak)
}

fn main() {
    let cfg = ModelConfig {
        layers: 4,
        ..ModelConfig::preset("gpt2-124m").expect("preset")
    };
    let (p, chunk) = (4, 4096);
    let fixed = 2 * cfg.layout().len() * 4;
    let mut rows = Vec::new();
    for s in [8192usize, 16384, 32768, 65536] {
        let f = peak(&cfg, Schedule::fpdt(s, p, s / chunk)).expect("fpdt");
        let u = peak(&cfg, Schedule::ulysses(s, p)).expect("ulysses");
        rows.push(vec![
            s.to_string(),
            fmt_bytes(f),
            fmt_bytes(f - fixed),
            fmt_bytes(u),
            fmt_bytes(u - fixed),
            format!("{:.1}x", (u - fixed) as f64 / (f - fixed) as f64),
        ]);
    }
    support::print_table(
        &format!(
            "peak device memory per rank, {} layers of gpt2-124m, P = {p}, chunk C = {chunk} (params + grads = {})",
            cfg.layers,
            fmt_bytes(fixed)
        ),
        &["S", "FPDT", "FPDT activations", "Ulysses", "Ulysses activations", "ratio"],
        &rows,
    );
}
