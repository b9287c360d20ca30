#!/usr/bin/env python3
"""Should a bfloat16 run decode in bfloat16? The VAE's own rounding next to the transformer's, and the decode time.

    .venv/bin/python scripts/vae_dtype.py [CONFIG] [--size 512] [--steps 8] [--decode-size 1024]

Four `zimage generate` runs on bench-cache/CONFIG (default mid) with the same seed: transformer float32 or
bfloat16 x VAE float32 or bfloat16. Each image is compared with the all-float32 one (mean and max |difference| of
the 8-bit pixels): the bfloat16 transformer's row is the rounding a bfloat16 run already accepts, the bfloat16
VAE's row what decoding in bfloat16 adds. Then one decode of random latents at --decode-size is timed in each
dtype (best of 2), on this CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def generate(model: Path, dtype: str, vae: str, size: int, steps: int, out: Path) -> np.ndarray:
    from PIL import Image

    cmd = [str(Path(sys.executable).parent / "zimage"), "generate", "--model-path", str(model), "--cpu",
           "--dtype", dtype, "--vae-dtype", vae, "--width", str(size), "--height", str(size), "--num-steps",
           str(steps), "--seed", "42", "-q", "--overwrite", "-o", str(out), "-p", "A red fox in a snowy birch forest"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return np.asarray(Image.open(out), dtype=np.int16)


def decode_seconds(model: Path, dtype, side: int) -> float:
    import torch

    from zimage.pipeline import load_vae

    vae = load_vae(model, torch.device("cpu"), dtype)
    z = torch.randn(1, vae.cfg.latent_channels, side // 8, side // 8, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            vae.decode(z)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="mid")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--decode-size", type=int, default=1024)
    a = ap.parse_args()
    model = ROOT / "bench-cache" / a.config
    with tempfile.TemporaryDirectory() as tmp:
        images = {(t, v): generate(model, t, v, a.size, a.steps, Path(tmp) / f"{t}-{v}.png")
                  for t in ("float32", "bfloat16") for v in ("float32", "bfloat16")}
    ref = images[("float32", "float32")]
    print(f"{a.config}, {a.size}x{a.size}, {a.steps} steps; 8-bit image vs the all-float32 one:")
    for (t, v), img in images.items():
        if (t, v) != ("float32", "float32"):
            d = np.abs(img - ref)
            print(f"  transformer {t:>8}, VAE {v:>8}: mean |diff| {d.mean():.3f}, max {d.max()}")
    import torch

    for dtype in (torch.float32, torch.bfloat16):
        print(f"decode {a.decode_size}x{a.decode_size} in {dtype}: {decode_seconds(model, dtype, a.decode_size):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
