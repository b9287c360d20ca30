#!/usr/bin/env python3
"""Attention at the full-size shape on this CPU: torch's SDPA against the alternatives, speed and error.

    .venv/bin/python scripts/attention_cpu.py [--tokens 4160] [--dtype bfloat16] [--compile]

One attention of a 1024x1024 image (30 heads x 128, 4,160 tokens, no mask), inputs of std 2 (scores of a few
units, as trained models have). Each variant's time (best of 2) and GFLOP/s (4 * H * N^2 * D), and its error
against float64 SDPA: relative (||y - y64|| / ||y64||) and max. Variants:
  sdpa strided        F.scaled_dot_product_attention on (B, L, H, D) storage seen as (B, H, L, D): what a
                      transposed projection gives (zimage before this measurement)
  sdpa contiguous     the same on (B, H, L, D)-contiguous inputs (zimage now)
  bf16 scores         per head, 256 queries at a time: q @ k^T in bfloat16 (scores rounded to bfloat16 before
                      the float32 softmax), p @ v in bfloat16
  f32 scores (oneDNN) per head, 256 queries at a time: q @ k^T as a float32 product in oneDNN (exact scores),
                      float32 softmax, p @ v in bfloat16 (what SDPA computes, from separate ops)
  flex (compiled)     torch.compile(flex_attention) with no score modification (--compile; needs a C++ compiler)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 30, 128


def bf16_scores(q, k, v, chunk=256):
    out, scale = torch.empty_like(q), q.shape[-1] ** -0.5
    for h in range(q.shape[1]):
        kt = k[0, h].t()
        for i in range(0, q.shape[2], chunk):
            s = torch.softmax((q[0, h, i : i + chunk] @ kt).float() * scale, -1)
            out[0, h, i : i + chunk] = s.to(v.dtype) @ v[0, h]
    return out


def f32_scores(q, k, v, chunk=256):
    lin = torch.ops.mkldnn._linear_pointwise
    out, scale = torch.empty_like(q), q.shape[-1] ** -0.5
    for h in range(q.shape[1]):
        qf, kf, vt = q[0, h].float() * scale, k[0, h].float(), v[0, h].t().contiguous()
        for i in range(0, q.shape[2], chunk):
            p = torch.softmax(lin(qf[i : i + chunk], kf, None, "none", [], ""), -1)
            out[0, h, i : i + chunk] = lin(p.to(v.dtype), vt, None, "none", [], "")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4160)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    dtype, n = getattr(torch, a.dtype), a.tokens
    torch.manual_seed(0)
    q, k, v = ((torch.randn(1, n, HEADS, HEAD_DIM) * s).to(dtype).transpose(1, 2) for s in (2, 2, 1))
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    flops = 4 * HEADS * n * n * HEAD_DIM
    variants = {"sdpa strided": lambda: F.scaled_dot_product_attention(q, k, v),
                "sdpa contiguous": lambda: F.scaled_dot_product_attention(qc, kc, vc),
                "bf16 scores": lambda: bf16_scores(qc, kc, vc),
                "f32 scores (oneDNN)": lambda: f32_scores(qc, kc, vc)}
    if a.compile:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
        variants["flex (compiled)"] = lambda: flex(qc, kc, vc)
    print(f"attention {HEADS} heads x {HEAD_DIM}, {n} tokens, {a.dtype}, {torch.get_num_threads()} threads")
    print(f"{'variant':<22} {'s':>7} {'GFLOP/s':>8} {'rel err':>9} {'max err':>9}")
    with torch.inference_mode():
        for name, f in variants.items():
            f()
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                y = f()
                best = min(best, time.perf_counter() - t0)
            err = y.double() - ref
            print(f"{name:<22} {best:>7.3f} {flops / best / 1e9:>8.0f} {(err.norm() / ref.norm()).item():>9.2e} "
                  f"{err.abs().max().item():>9.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
