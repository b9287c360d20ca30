#!/usr/bin/env python3
"""What a LoRA costs while the transformer loads: time to merge it and peak memory, with one LoRA against none.

    .venv/bin/python scripts/bench_lora.py CONFIG [--rank 32] [--dtype float32|bfloat16] [--repeats 2]

CONFIG is mid or full (random checkpoints in bench-cache/CONFIG, written by scripts/make_checkpoint.py when
missing), or a checkpoint folder given with --model-path. The LoRA is random, rank --rank, stored in bfloat16 in
the kohya layout (as most published Z-Image LoRAs are), on every attention, feed-forward and adaLN linear of every
block, refiners included; it is written to bench-cache/CONFIG-lora-rRANK.safetensors once.

Each load runs in its own child process (alternating none, lora, none, lora...), so its peak RSS is its own
(ru_maxrss from wait4); times are the best and peaks the highest of the repeats. A child loads the transformer with zimage.pipeline.load_transformer, with or without the
LoRA's patch, reports the load's wall time and the time spent inside the patch (computing and adding the
deltas), then reads every weight once (float32 weights stay memory-mapped, and so out of RSS, until the first
step reads them), so that both peaks count the whole model. The requirement checked: peak RSS with the LoRA exceeds peak RSS without by no more than the LoRA file's
size plus one linear layer's float32 weight (the largest one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
TARGETS = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.", ".attention.to_out.0.", ".feed_forward.w1.",
           ".feed_forward.w2.", ".feed_forward.w3.", ".adaLN_modulation.0.")


def child(a) -> None:
    import resource

    import torch

    from zimage.lora import LoraSet, model_shapes, read_lora
    from zimage.pipeline import load_transformer

    if a.threads:
        torch.set_num_threads(a.threads)
    model = Path(a.model_path)
    spent = [0.0]
    t0 = time.perf_counter()
    patch = None
    if a.child == "lora":
        loras = LoraSet([(read_lora(Path(a.lora), model_shapes(model)), 1.0)])
        merge = loras.patch("transformer")

        def patch(key, weight):
            ts = time.perf_counter()
            out = merge(key, weight)
            spent[0] += time.perf_counter() - ts
            return out

    with torch.inference_mode():
        transformer = load_transformer(model, torch.device("cpu"), getattr(torch, a.dtype), patch=patch)
        if patch is not None:
            loras.close()  # as the pipeline does once the transformer is loaded
        load = time.perf_counter() - t0
        # float32 weights stay memory-mapped until used: read each once, as the first denoising step does, so that
        # both runs count every weight in their peak
        n = sum(p.numel() for p in transformer.parameters() if p.float().sum() is not None)
    ready = time.perf_counter() - t0
    Path(a.result).write_text(json.dumps({"load": load, "ready": ready, "merge": spent[0], "params": n,
                                          "peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def write_lora(model: Path, path: Path, rank: int) -> None:
    """A random rank-`rank` LoRA in bfloat16, kohya names with alpha = rank, written one module at a time."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "src"))
    from zimage.weights import WEIGHT_STEMS, checkpoint_header

    header = checkpoint_header(model / "transformer", WEIGHT_STEMS["transformer"])
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, (_, info) in sorted(header.items()):
        if len(info.shape) != 2 or not any(t in key for t in TARGETS):
            continue
        out, inp = info.shape
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        state[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=gen) / inp**0.5).to(torch.bfloat16)
        state[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).to(torch.bfloat16)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def largest_linear_bytes(model: Path) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from zimage.weights import WEIGHT_STEMS, checkpoint_header

    header = checkpoint_header(model / "transformer", WEIGHT_STEMS["transformer"])
    return max(info.numel * 4 for _, info in header.values() if len(info.shape) == 2)


def run_child(a, kind: str, lora: Path, model: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, __file__, a.config, "--child", kind, "--result", str(result), "--model-path",
               str(model), "--lora", str(lora), "--dtype", a.dtype, "--threads", str(a.threads)]
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"child {kind} failed with status {status}")
        res = json.loads(result.read_text())
        res["peak_rss"] = usage.ru_maxrss * 1024
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", choices=["mid", "full"])
    ap.add_argument("--model-path")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (default: torch's)")
    ap.add_argument("--child", choices=["none", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return 0

    model = Path(a.model_path) if a.model_path else ROOT / "bench-cache" / a.config
    if not (model / "model_index.json").is_file():
        print(f"# {model} missing: writing the random '{a.config}' checkpoint", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), a.config, "--out", str(model)],
                       check=True)
    lora = ROOT / "bench-cache" / f"{model.name}-lora-r{a.rank}.safetensors"
    if not lora.is_file():
        write_lora(model, lora, a.rank)
    runs = {"none": [], "lora": []}
    run_child(a, "none", lora, model)  # once unmeasured, so every measured load finds the files in the page cache
    for _ in range(a.repeats):
        for kind in runs:
            runs[kind].append(run_child(a, kind, lora, model))
    best = {k: {"load": min(r["load"] for r in v), "ready": min(r["ready"] for r in v),
                "merge": min(r["merge"] for r in v), "peak_rss": max(r["peak_rss"] for r in v)}
            for k, v in runs.items()}
    file_size, layer = lora.stat().st_size, largest_linear_bytes(model)
    extra = best["lora"]["peak_rss"] - best["none"]["peak_rss"]
    allowed = file_size + layer
    print(f"# {a.config}: {runs['none'][0]['params'] / 1e9:.2f}B-parameter transformer loaded as {a.dtype} on the "
          f"CPU ({a.threads or 'default'} torch threads); LoRA rank {a.rank}, {file_size / MiB:.0f} MiB ({lora.name}); best of {a.repeats}, page cache warm")
    print("| | load (s) | load + first read of every weight (s) | merging, inside the load (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for k in runs:
        print(f"| {'no LoRA' if k == 'none' else 'one LoRA'} | {best[k]['load']:.2f} | {best[k]['ready']:.2f} | "
              f"{best[k]['merge']:.2f} | {best[k]['peak_rss'] / MiB:.0f} |")
    print(f"LoRA adds {best['lora']['ready'] - best['none']['ready']:.2f} s until the weights are ready and "
          f"{extra / MiB:.0f} MiB to "
          f"peak RSS; allowed: file {file_size / MiB:.0f} MiB + largest linear weight (float32) {layer / MiB:.0f} MiB "
          f"= {allowed / MiB:.0f} MiB -> {'OK' if extra <= allowed else 'OVER'}")
    return 0 if extra <= allowed else 1


if __name__ == "__main__":
    sys.exit(main())
