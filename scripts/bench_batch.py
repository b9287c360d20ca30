"""Images per hour of a batch of prompts: one `zimage generate` process against `torchrun --nproc-per-node N`
processes of one thread each, end to end (start, loading, every image written), on the same prompts file.

    python scripts/bench_batch.py                       # 64 prompts, a tiny random checkpoint, 64x64, 2 steps
    python scripts/bench_batch.py --model weights/Z-Image-Turbo --size 1024 --steps 8 --prompts 16 --nproc 8

Prints one Markdown table row per configuration; --check also runs one process with one thread and checks
that torchrun made byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
WORDS = ["red", "blue", "green", "old", "tiny", "giant", "quiet", "bright"]
THINGS = ["car", "boat", "tree", "lighthouse", "cat", "mountain", "bowl of fruit", "castle"]


def prompts_file(folder: Path, n: int) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(f"a {WORDS[i % 8]} {THINGS[i // 8 % 8]}, picture {i}\n" for i in range(n)))
    return path


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return time.perf_counter() - t0


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: a fresh tiny random one)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (torchrun then uses one GPU per process)")
    ap.add_argument("--check", action="store_true", help="also run one process with one thread and compare files")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            model = root / "tiny"
            subprocess.run([str(BIN / "zimage"), "make-tiny", str(model)], check=True, capture_output=True)
        prompts = prompts_file(root, args.prompts)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        def generate(out: str) -> list[str]:
            return ["generate", "--model-path", str(model), "--prompts-file", str(prompts), "--width",
                    str(args.size), "--height", str(args.size), "--num-steps", str(args.steps), "--seed", "1",
                    "--device", args.device, "-q", "-o", str(root / out / "{index}.png")]

        one = timed([str(BIN / "zimage"), *generate("one")], env)
        many = timed([str(BIN / "torchrun"), "--nproc-per-node", str(args.nproc), "-m", "zimage",
                      *generate("many")], {**env, "OMP_NUM_THREADS": "1"})
        print(f"| {args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {args.device} "
              f"| 1 process | {one:.1f} s | {args.prompts / one * 3600:.0f} |")
        print(f"| {args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {args.device} "
              f"| torchrun {args.nproc} x 1 thread | {many:.1f} s | {args.prompts / many * 3600:.0f} |")
        if args.check:
            single = timed([str(BIN / "zimage"), *generate("one1")], {**env, "OMP_NUM_THREADS": "1"})
            print(f"| {args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {args.device} "
                  f"| 1 process x 1 thread | {single:.1f} s | {args.prompts / single * 3600:.0f} |")
            same = digests(root / "one1") == digests(root / "many")
            print(f"torchrun files identical to one single-thread process: {same}")
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
