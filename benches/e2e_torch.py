#!/usr/bin/env python3
"""The same training step as `fpdt train`'s default, in PyTorch on the CPU.

tiny-llama (vocabulary 96, hidden 32, 2 layers, 4 heads of 8, 2 kv heads,
SwiGLU MLP of 64, RMSNorm, rotate-half RoPE with theta 10000, untied head),
one sequence of --seq-len tokens per step: forward, backward, AdamW
(lr 3e-3, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0.
Attention is torch's scaled_dot_product_attention (causal). Prints one JSON
line: {"tokens_per_s": median over the timed steps, "threads": ..., ...}.

Run by `cargo bench -p fpdt-model --bench e2e`, which skips it with a
message where torch is not installed. Needs torch >= 2.4 (torch.nn.RMSNorm).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def rope(x, theta):
    # x: [batch, heads, seq, dim]; rotate-half pairs i with i + dim/2.
    s, d = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2 / d)
    ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, h, heads, kv, ffn):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, h // heads
        self.n1 = torch.nn.RMSNorm(h, eps=1e-5)
        self.q = torch.nn.Linear(h, h, bias=False)
        self.k = torch.nn.Linear(h, kv * self.d, bias=False)
        self.v = torch.nn.Linear(h, kv * self.d, bias=False)
        self.o = torch.nn.Linear(h, h, bias=False)
        self.n2 = torch.nn.RMSNorm(h, eps=1e-5)
        self.gate = torch.nn.Linear(h, ffn, bias=False)
        self.up = torch.nn.Linear(h, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, h, bias=False)

    def forward(self, x, theta):
        b, s, h = x.shape
        y = self.n1(x)
        q = self.q(y).view(b, s, self.heads, self.d).transpose(1, 2)
        k = self.k(y).view(b, s, self.kv, self.d).transpose(1, 2)
        v = self.v(y).view(b, s, self.kv, self.d).transpose(1, 2)
        q, k = rope(q, theta), rope(k, theta)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Model(torch.nn.Module):
    def __init__(self, vocab=96, h=32, layers=2, heads=4, kv=2, ffn=64, theta=1e4):
        super().__init__()
        self.theta = theta
        self.embed = torch.nn.Embedding(vocab, h)
        self.layers = torch.nn.ModuleList(Layer(h, heads, kv, ffn) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(h, eps=1e-5)
        self.head = torch.nn.Linear(h, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.theta)
        return self.head(self.norm(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = Model()
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for i in range(a.warmup + a.steps):
        tokens = torch.randint(0, 96, (1, a.seq_len))
        labels = torch.randint(0, 96, (1, a.seq_len))
        t0 = time.perf_counter()
        loss = F.cross_entropy(m(tokens).view(-1, 96), labels.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({
        "tokens_per_s": a.seq_len / med,
        "step_s": med,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": sum(p.numel() for p in m.parameters()),
    }))


if __name__ == "__main__":
    main()
