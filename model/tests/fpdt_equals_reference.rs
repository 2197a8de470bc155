//! THE invariant: for any chunking u, sequence parallelism P, offload and
//! checkpointing setting, the FPDT model's loss and every parameter
//! gradient equal the dense f64 reference model's (f32 storage: 1e-4).

mod common;

use common::*;
use fpdt_model::{reference, FpdtGroup, ModelConfig, Schedule};

/// Compares per tensor: `max |g - ref| <= tol * max |ref|` of the tensor,
/// and the loss to `tol` relative.
fn compare(
    cfg: &ModelConfig,
    loss: f64,
    grads: &[f32],
    r: &reference::RefOutput,
    tol: f64,
    what: &str,
) {
    let rel = (loss - r.loss).abs() / r.loss.abs();
    assert!(
        rel < tol,
        "{what}: loss {loss} vs reference {} (rel {rel:e})",
        r.loss
    );
    for e in cfg.layout().entries() {
        let g: Vec<f64> = grads[e.range()].iter().map(|&x| f64::from(x)).collect();
        let gr = &r.grads[e.range()];
        let scale = gr.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            scale > 0.0,
            "{what}: reference gradient of {} is zero",
            e.name
        );
        let (err, i) = max_rel(&g, gr, scale);
        assert!(
            err < tol,
            "{what}: {}[{i}] = {} vs reference {} (err {err:e} of the tensor's max {scale:e})",
            e.name,
            g[i],
            gr[i]
        );
    }
}

fn check(
    cfg: &ModelConfig,
    seq: usize,
    ranks: usize,
    chunks: usize,
    offload: bool,
    checkpoint: bool,
) {
    let what = format!(
        "{:?} S={seq} P={ranks} u={chunks} offload={offload} checkpoint={checkpoint}",
        cfg.family
    );
    let params = random_params(cfg, 7);
    let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
    let (tokens, targets) = random_batch(cfg, seq, 3);
    let r = reference::loss_and_grads(cfg, &params, &tokens, &targets).unwrap();
    let sched = Schedule {
        offload,
        checkpoint,
        ..Schedule::fpdt(seq, ranks, chunks)
    };
    let mut g = FpdtGroup::cpu(cfg, sched, &p32, &cpu()).unwrap();
    let out = g.step(&tokens, &targets).unwrap();
    compare(cfg, out.loss, &out.grads, &r, 1e-4, &what);
    // Every rank holds the same reduced gradient.
    for rk in g.ranks() {
        assert_eq!(rk.grads().unwrap(), out.grads, "{what}: rank {}", rk.rank());
    }
}

#[test]
fn gpt_single_rank_single_chunk_equals_reference() {
    check(&tiny_gpt(), 12, 1, 1, false, false);
}

#[test]
fn llama_single_rank_single_chunk_equals_reference() {
    check(&tiny_llama(), 12, 1, 1, false, false);
}

/// A Llama with GQA whose kv heads split over 4 ranks.
fn llama_p4() -> ModelConfig {
    ModelConfig {
        rope_theta: 10_000.0,
        ..ModelConfig::llama(31, 32, 2, 8, 4, 40)
    }
}

fn grid(cfg: &ModelConfig, ranks: &[usize]) {
    for &p in ranks {
        for u in 1..=4 {
            // c = 3 tokens per rank and chunk (S not a power of two) and,
            // for one setting, c = 5 with a ragged MLP/loss sub-chunk.
            for (offload, checkpoint) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                check(cfg, 3 * u * p, p, u, offload, checkpoint);
            }
        }
    }
}

#[test]
fn gpt_equals_reference_for_all_chunkings_ranks_offload_checkpointing() {
    grid(&tiny_gpt(), &[1, 2, 4]);
}

#[test]
fn llama_gqa_equals_reference_for_all_chunkings_and_two_ranks() {
    grid(&tiny_llama(), &[1, 2]);
}

#[test]
fn llama_gqa_equals_reference_on_four_ranks() {
    grid(&llama_p4(), &[4]);
}

#[test]
fn ragged_sub_chunks_equal_reference() {
    // c = 5 tokens per rank and chunk with MLP chunks of 2 and loss chunks
    // of 3 rows: sub-chunks that do not divide the chunk.
    let cfg = tiny_gpt();
    let (tokens, targets) = random_batch(&cfg, 30, 5);
    let params = random_params(&cfg, 9);
    let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
    let r = reference::loss_and_grads(&cfg, &params, &tokens, &targets).unwrap();
    let sched = Schedule {
        mlp_chunk: 2,
        loss_chunk: 3,
        ..Schedule::fpdt(30, 2, 3)
    };
    let mut g = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).unwrap();
    let out = g.step(&tokens, &targets).unwrap();
    compare(&cfg, out.loss, &out.grads, &r, 1e-4, "ragged");
}
