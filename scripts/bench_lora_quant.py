#!/usr/bin/env python3
"""A LoRA on a weight stored quantized: merged into the dequantized weight and quantized again, or computed beside
it as a low-rank product (what zimage does, lowrank.py). One real-size layer, measured both ways.

    .venv/bin/python scripts/bench_lora_quant.py [--out 10240] [--in 3840] [--rank 32] [--tokens 320]
                                                 [--ratio 0.05] [--threads 1] [--repeats 7] [--json FILE]

The layer is the published feed-forward w1 (10240 x 3840) by default, its input 320 tokens (a 256x256 image and
its caption) in bfloat16. The weight is random (normal, std 0.02) stored as Q8_0, Q4_0 (gguf-py's quantizer) and
Q4_K (random K blocks scaled to the same RMS: gguf-py cannot write K types, nor can it quantize to them again, so
its "merge" row re-quantizes to Q4_0, the legacy type of the same size). The LoRA is random, rank `--rank`, its
update `--ratio` of the weight's norm.

For each type and way: the output's relative error against the exact result x (W + dW)^T (float64, W the file's
dequantized weight), the same against the bfloat16 merge (W + dW rounded to bfloat16, computed in bfloat16: what a
bfloat16 checkpoint with the LoRA merged gives), the error of the LoRA's own effect ||(y - x W^T) - x dW^T|| /
||x dW^T||, the extra load time (side: casting the factors; merge: dequantize, add, quantize again with gguf-py),
the forward time (median of `--repeats`), and the bytes held.

With `--model-path DIR` (e.g. bench-cache/mid), the same at the model level: the transformer as a Q4_0 GGUF
(written once under `--work` by scripts/quant_error.py's gguf_variant), loaded in bfloat16 as a run loads it with
and without a random rank-`--rank` kohya LoRA on every attention, feed-forward and adaLN linear of every block:
load time, one forward at 256x256 (latent 32x32, 40 caption tokens; median of `--repeats`), bytes held.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants  # noqa: E402

from zimage.lowrank import LowRank, add_update  # noqa: E402
from zimage.quant import QuantLinear, QWeight  # noqa: E402

SCALE_FIELDS = {Q.Q4_K: (0, 2)}  # byte offsets of the float16 d and dmin of a Q4_K block


def k_blocks(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random `qtype` blocks scaled to the RMS of `w` (dequantization is linear in the block scales)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(w.size // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        raw[:, off : off + 2] = (rng.standard_normal(len(raw)) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    factor = np.sqrt((w**2).mean() / (quants.dequantize(raw.reshape(w.shape[0], -1), qtype) ** 2).mean())
    for off in SCALE_FIELDS[qtype]:
        scale = raw[:, off : off + 2].copy().view(np.float16).astype(np.float32) * factor
        raw[:, off : off + 2] = scale.astype(np.float16).view(np.uint8)
    return raw.reshape(w.shape[0], -1)


def layer(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> QuantLinear:
    return QuantLinear(QWeight(qtype.name, shape, torch.from_numpy(raw)), None)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_lora(model: Path, rank: int, path: Path) -> Path:
    """A random rank-`rank` kohya LoRA (bfloat16, alpha = rank) on every block's attention, feed-forward and adaLN
    linear (refiners included)."""
    from safetensors.torch import save_file

    from zimage.lora import model_shapes

    gen, state = torch.Generator().manual_seed(1), {}
    for key, (out, inp) in ((k, s) for k, s in model_shapes(model)["transformer"].items() if len(s) == 2):
        if "refiner." not in key and not key.startswith("layers.") or "norm" in key:
            continue
        k = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        state |= {f"{k}.lora_down.weight": (torch.randn(rank, inp, generator=gen) / inp**0.5).bfloat16(),
                  f"{k}.lora_up.weight": (torch.randn(out, rank, generator=gen) * 0.01).bfloat16(),
                  f"{k}.alpha": torch.tensor(float(rank))}
    save_file(state, str(path))
    return path


@torch.inference_mode()
def model_level(model: Path, work: Path, rank: int, repeats: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from quant_error import gguf_variant

    from zimage.lora import LoraSet, model_shapes, read_lora
    from zimage.pipeline import load_transformer

    work.mkdir(parents=True, exist_ok=True)
    folder = gguf_variant(model, "Q4_0", work)
    lora = random_lora(model, rank, work / f"lora-r{rank}.safetensors")
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 32, 32, generator=gen).bfloat16(), torch.rand(1, generator=gen)
    rows = []
    for with_lora in (False, True, False, True):
        t0 = time.perf_counter()
        patch = LoraSet([(read_lora(lora, model_shapes(folder)), 1.0)]).patch("transformer") if with_lora else None
        m = load_transformer(folder, cpu, torch.bfloat16, patch=patch)
        load = time.perf_counter() - t0
        caps = [torch.randn(40, m.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(1)).bfloat16()]
        held = sum(p.numel() * p.element_size() for p in m.parameters())
        held += sum(b.numel() * b.element_size() for b in m.buffers())
        rows.append({"lora": with_lora, "load_s": load, "forward_s": timed(lambda: m(x, t, caps), repeats),
                     "bytes": held})
        del m
    print(f"\n{model.name} as Q4_0 GGUF, bfloat16, 256x256, LoRA rank {rank} on every block linear")
    for r in rows:
        print(f"{'LoRA beside' if r['lora'] else 'no LoRA':12} load {r['load_s']:6.2f} s  forward {r['forward_s']:6.2f} s"
              f"  held {r['bytes'] / 2**20:7.1f} MiB")
    return rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=int, default=10240)
    ap.add_argument("--in", dest="inp", type=int, default=3840)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--ratio", type=float, default=0.05, help="||dW|| / ||W||")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model-path", type=Path, help="also measure this checkpoint's transformer as a Q4_0 GGUF")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-cache" / "quant")
    ap.add_argument("--skip-layer", action="store_true", help="only the model-level measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_path:
        model_rows = model_level(args.model_path, args.work, args.rank, args.repeats)
        if args.json:
            args.json.with_suffix(".model.json").write_text(json.dumps(model_rows, indent=1))
    if args.skip_layer:
        return
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    shape = (args.out, args.inp)
    w0 = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    down = torch.randn(args.rank, args.inp, generator=gen) / args.inp**0.5
    up = torch.randn(args.out, args.rank, generator=gen)
    x = torch.randn(args.tokens, args.inp, generator=gen).bfloat16()
    x64 = x.double()
    rows = []
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_K):
        raw = k_blocks(w0, qtype, rng) if qtype == Q.Q4_K else quants.quantize(w0, qtype)
        w = torch.from_numpy(quants.dequantize(raw, qtype).copy())
        up_s = up * (args.ratio * w.norm() / (up @ down).norm())  # the update `ratio` of the weight's norm
        delta = up_s @ down
        exact = x64 @ (w.double() + delta.double()).T
        effect = x64 @ delta.double().T
        base_y = x64 @ w.double().T
        merged_bf16 = (x @ (w + delta).bfloat16().T).double()

        def row(way: str, y: torch.Tensor, load_s: float, forward_s: float, nbytes: int, held_as: str) -> dict:
            y = y.double()
            return {"type": qtype.name, "way": way, "held_as": held_as,
                    "rel_err_exact": ((y - exact).norm() / exact.norm()).item(),
                    "rel_err_bf16_merge": ((y - merged_bf16).norm() / merged_bf16.norm()).item(),
                    "lora_effect_err": (((y - base_y) - effect).norm() / effect.norm()).item(),
                    "extra_load_s": load_s, "forward_ms": forward_s * 1e3, "bytes": nbytes}

        plain = layer(raw, qtype, shape)
        t_plain = timed(lambda: plain(x), args.repeats)
        rows.append(row("no LoRA", plain(x), 0.0, t_plain, raw.nbytes, qtype.name))
        rows.append(row("bf16 merge (reference)", merged_bf16, 0.0, float("nan"), w.numel() * 2, "BF16"))

        side = layer(raw, qtype, shape)
        t0 = time.perf_counter()
        add_update(side, LowRank(down.bfloat16(), up_s.bfloat16()))
        load = time.perf_counter() - t0
        rows.append(row(f"side path r{args.rank}", side(x), load, timed(lambda: side(x), args.repeats),
                        raw.nbytes + (down.numel() + up_s.numel()) * 2, f"{qtype.name} + bf16 factors"))
        rows[-1]["side_alone_ms"] = timed(lambda: side.lora(x), args.repeats) * 1e3  # the update's product alone

        again = qtype if qtype != Q.Q4_K else Q.Q4_0  # gguf-py cannot quantize to K types
        t0 = time.perf_counter()
        merged = (torch.from_numpy(quants.dequantize(raw, qtype).copy()) + delta).numpy()
        raw2 = quants.quantize(merged, again)
        load = time.perf_counter() - t0
        requant = layer(raw2, again, shape)
        rows.append(row("merge + re-quantize", requant(x), load, timed(lambda: requant(x), args.repeats),
                        raw2.nbytes, again.name))
    head = (f"{'type':5} {'way':24} {'held as':20} {'err/exact':>9} {'err/bf16':>9} {'LoRA err':>9} "
            f"{'+load s':>8} {'fwd ms':>7} {'MiB':>6}")
    print(f"layer {args.out}x{args.inp}, {args.tokens} tokens bf16, LoRA rank {args.rank} (|dW|/|W| = {args.ratio}), "
          f"{args.threads} thread(s), torch {torch.__version__}")
    w = torch.randn(shape, generator=gen).bfloat16()
    print(f"a plain bfloat16 product of this size: {timed(lambda: x @ w.T, args.repeats) * 1e3:.1f} ms")
    print(head)
    for r in rows:
        if "side_alone_ms" in r:
            print(f"{'':5} (the side product alone: {r['side_alone_ms']:.1f} ms)")
        print(f"{r['type']:5} {r['way']:24} {r['held_as']:20} {r['rel_err_exact']:9.2e} {r['rel_err_bf16_merge']:9.2e} "
              f"{r['lora_effect_err']:9.2e} {r['extra_load_s']:8.3f} {r['forward_ms']:7.1f} {r['bytes'] / 2**20:6.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
