#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention (flash backend) at the shape of
fpdt's GPU attention bench: bf16, causal, 16K tokens, 16 heads, head dim
128. Prints forward and backward TFLOP/s with the same FLOP count as
ptx/benches/gpu.rs (causal: half the scores; backward = 2.5 x forward), and,
given --ours FILE with that bench's RESULT lines, the ratio ours/theirs.
Exits 0 with a message where torch or a GPU is missing."""
import argparse
import re
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="output of the gpu bench (RESULT lines)")
    ap.add_argument("--tokens", type=int, default=16 * 1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("sdpa bench: skipped: no torch")
        return 0
    if not torch.cuda.is_available():
        print("sdpa bench: skipped: torch sees no GPU")
        return 0
    s, h, d = a.tokens, a.heads, a.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    fwd_flops = 4.0 * s * s * h * d / 2.0
    bwd_flops = 2.5 * fwd_flops

    def timed(fn, reps=3, rounds=5):
        out = []
        for _ in range(rounds):
            a_, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a_.record()
            for _ in range(reps):
                fn()
            b_.record()
            torch.cuda.synchronize()
            out.append(a_.elapsed_time(b_) / 1e3 / reps)
        out.sort()
        return out[len(out) // 2]

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except ImportError:  # older torch
        ctx = torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
                                             enable_mem_efficient=False)
    with ctx:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(do)  # warm-up
        tf = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        tb = timed(lambda: o.backward(do, retain_graph=True))
    theirs = {"fwd": fwd_flops / tf / 1e12, "bwd": bwd_flops / tb / 1e12}
    ours = {}
    if a.ours:
        for line in open(a.ours):
            m = re.match(r"RESULT attn_(fwd|bwd) tflops=([0-9.]+)", line)
            if m:
                ours[m.group(1)] = float(m.group(2))
    print(f"\n## Attention beside torch {torch.__version__} SDPA (flash), bf16, causal, "
          f"{s} tokens, {h} heads, head dim {d}")
    print("| pass | ours TFLOP/s | SDPA TFLOP/s | ours / SDPA |")
    print("|---|---|---|---|")
    for key, name in (("fwd", "forward"), ("bwd", "backward")):
        o_ = ours.get(key)
        ratio = f"{o_ / theirs[key]:.2f}" if o_ else "-"
        print(f"| {name} | {o_ if o_ else '-'} | {theirs[key]:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
