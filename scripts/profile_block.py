#!/usr/bin/env python3
"""Where one full-size transformer block's time goes on this machine, op by op (torch.profiler).

    .venv/bin/python scripts/profile_block.py [--tokens 4160] [--dtype bfloat16] [--quantize none|int8] [--runs 2]

One main-layer block of the published shapes (dim 3840, 30 heads x 128, SwiGLU 10240, adaLN), random weights,
on `--tokens` tokens (4160 = a 1024x1024 image's 4096 patches + a 64-token caption), the same code a run uses
(zimage.transformer.TransformerBlock, zimage.quant.QuantLinear for --quantize int8). Prints the wall time per
block, then every op's share of the profiled time; ops at or above 2% are the ones BENCHMARKS.md names.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from zimage.quant import INT8_ACTIVATIONS, QuantLinear, quantize_int8  # noqa: E402
from zimage.transformer import ADALN_DIM, TransformerBlock, TransformerConfig  # noqa: E402


def build(dtype: torch.dtype, quantize: str) -> TransformerBlock:
    torch.manual_seed(0)
    block = TransformerBlock(TransformerConfig(), modulation=True)
    for p in block.parameters():  # weights of the scale tiny.randomize uses, so activations stay finite
        torch.nn.init.uniform_(p, -(3 / p.shape[-1]) ** 0.5, (3 / p.shape[-1]) ** 0.5) if p.ndim == 2 \
            else torch.nn.init.normal_(p, 1.0, 0.02)
    block = block.to(dtype).requires_grad_(False).eval()
    if quantize == "int8":
        for name, m in list(block.named_modules()):
            if isinstance(m, torch.nn.Linear) and m.in_features > ADALN_DIM:
                q = QuantLinear(quantize_int8(m.weight), m.bias)
                q.int8_activations = INT8_ACTIVATIONS is not None
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, q)
    return block


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4160)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--quantize", default="none", choices=("none", "int8"))
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    block = build(dtype, a.quantize)
    cfg = TransformerConfig()
    from zimage.rope import RopeTables

    ids = torch.stack([torch.arange(a.tokens) // 64, torch.arange(a.tokens) % 64, torch.arange(a.tokens) % 64], -1)
    rope = RopeTables(cfg.rope_theta, cfg.axes_dims, cfg.axes_lens)(ids[None, None])
    x = torch.randn(1, a.tokens, cfg.dim, dtype=dtype)
    t_emb = torch.randn(1, ADALN_DIM, dtype=dtype)
    with torch.inference_mode():
        block(x, rope, None, t_emb)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.runs):
            block(x, rope, None, t_emb)
        wall = (time.perf_counter() - t0) / a.runs
        with torch.profiler.profile() as prof:
            block(x, rope, None, t_emb)
    print(f"one block, {a.tokens} tokens, {a.dtype}, quantize {a.quantize}"
          f"{' (int8 activations: ' + str(INT8_ACTIVATIONS) + ')' if a.quantize == 'int8' else ''}, "
          f"{torch.get_num_threads()} threads: {wall:.3f} s")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{'op':<48} {'calls':>5} {'ms':>9} {'share':>6}")
    for e in events:
        share = e.self_cpu_time_total / total
        if share >= 0.002:
            print(f"{e.key:<48} {e.count:>5} {e.self_cpu_time_total / 1e3:>9.1f} {share:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
