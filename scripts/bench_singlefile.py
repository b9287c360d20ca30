#!/usr/bin/env python3
"""Loading the transformer from a single file in the original/ComfyUI layout (fused qkv, read as row slices)
against the published folder: wall time and peak RSS of each, in fresh processes, with equal tensors checked.

    .venv/bin/python scripts/bench_singlefile.py MODEL_DIR [--dtype bfloat16] [--repeat 2]

MODEL_DIR is a checkpoint in the published layout (e.g. bench-cache/mid from scripts/make_checkpoint.py mid).
The single file is written next to it once (MODEL_DIR.original.safetensors); writing it holds the transformer in
memory, so use it on sizes that fit (mid: 1.2 GB)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, sys, time, resource, torch
from pathlib import Path
from zimage.modelfiles import ModelFiles
from zimage.pipeline import load_transformer
model, single, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
source = ModelFiles(model, transformer=Path(single)) if single else model
t0 = time.perf_counter()
m = load_transformer(source, torch.device("cpu"), dtype)
seconds = time.perf_counter() - t0
digest = float(sum(p.double().sum() for p in m.parameters()))
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "checksum": digest}))
"""


def write_original(model: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from test_singlefile import folder_state, to_original_transformer

    save_file({k: v.contiguous() for k, v in
               to_original_transformer(folder_state(model, "transformer"), "model.diffusion_model.").items()},
              str(out))


def measure(model: Path, single: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), single, dtype], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    single = a.model.with_name(a.model.name + ".original.safetensors")
    if not single.exists():
        write_original(a.model, single)
    for label, path in (("folder", ""), ("original single file", str(single))) * a.repeat:
        r = measure(a.model, path, a.dtype)
        print(f"{label:<22} {r['seconds']:6.2f} s  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  "
              f"checksum {r['checksum']:.6e}")
    print(f"(torch {__import__('torch').__version__}, {a.dtype}, files in the page cache after the first run)")


if __name__ == "__main__":
    main()
