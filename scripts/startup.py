#!/usr/bin/env python3
"""Start-up cost of `zimage` as shell scripts and CI pay it: whole processes, from exec to exit.

    .venv/bin/python scripts/startup.py [--repeat 5] [--model-path DIR] [--importtime] [--json FILE]

Cases (each a fresh process; the median of --repeat runs, rounds interleaved so that load drift hits all alike):
  help       zimage --help
  usage      zimage generate -p "a cat" --width 1000            (a usage error: exit 2)
  check      zimage check TINY
  image      zimage generate --model-path TINY ... 64x64, 2 steps, seed 1, -q
  reference  the same image with diffusers' ZImagePipeline, as a whole `python -c` process

TINY is a tiny random checkpoint written with `zimage make-tiny` into a temporary folder (or --model-path).
Wall time is what a script waits; CPU time (user + system of the child, from getrusage) is what the process
itself burned, which other load on the machine changes much less, so both are printed.
With --importtime, each case runs once more under `python -X importtime` and the packages with the most
import time (self time, summed by package) are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ZIMAGE = Path(sys.executable).parent / "zimage"
PROMPT = "a red fox in the snow"
REFERENCE = """
import sys
import torch
from diffusers import ZImagePipeline

pipe = ZImagePipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
image = pipe(sys.argv[3], width=64, height=64, num_inference_steps=2, guidance_scale=0.0,
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(sys.argv[2])
"""


def zimage_command() -> list[str]:
    return [str(ZIMAGE)] if ZIMAGE.exists() else [sys.executable, "-m", "zimage"]


def cases(model: Path, out: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (command, expected exit code)."""
    z = zimage_command()
    return {
        "help": (z + ["--help"], 0),
        "usage": (z + ["generate", "-p", "a cat", "--width", "1000"], 2),
        "check": (z + ["check", str(model)], 0),
        "image": (z + ["generate", "--model-path", str(model), "-p", PROMPT, "--width", "64", "--height", "64",
                       "--num-steps", "2", "--seed", "1", "-q", "--overwrite", "-o", str(out / "zimage.png")], 0),
        "reference": ([sys.executable, "-c", REFERENCE, str(model), str(out / "reference.png"), PROMPT], 0),
    }


def run_once(command: list[str], expected: int, env: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != expected:
        sys.exit(f"{' '.join(command)} exited {result.returncode} (expected {expected}):\n{result.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_report(command: list[str], env: dict, top: int = 8) -> list[tuple[str, float]]:
    """(package, seconds) with the most import self time under `python -X importtime`."""
    if command[0] == str(ZIMAGE):
        command = [sys.executable, "-m", "zimage", *command[1:]]
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, env=env)
    totals: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        package = ".".join(name.strip().split(".")[:2])
        totals[package] = totals.get(package, 0.0) + int(self_us) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model-path", type=Path, help="checkpoint for check/image/reference (default: a tiny one)")
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    with tempfile.TemporaryDirectory(prefix="zimage-startup-") as tmp:
        out = Path(tmp)
        model = a.model_path
        if model is None:
            model = out / "tiny"
            subprocess.run(zimage_command() + ["make-tiny", str(model)], check=True, capture_output=True, env=env)
        todo = {k: v for k, v in cases(model, out).items() if not a.only or k in a.only}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in todo}
        load = [os.getloadavg()[0]]
        for _ in range(a.repeat):
            for name, (command, expected) in todo.items():
                times[name].append(run_once(command, expected, env))
            load.append(os.getloadavg()[0])
        imports = {name: import_report(cmd, env) for name, (cmd, _) in todo.items()} if a.importtime else {}

    print(f"whole processes, median of {a.repeat} (1-minute load average during the runs: "
          f"{min(load):.1f} .. {max(load):.1f} on {os.cpu_count()} CPUs)\n")
    print("| case | wall s (median) | wall s (min) | CPU s (median) |")
    print("|---|---|---|---|")
    result = {}
    for name, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        result[name] = {"wall": walls, "cpu": cpus}
        print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f} | {statistics.median(cpus):.2f} |")
    for name, rows in imports.items():
        print(f"\nimport self time by package, `{name}`: " + ", ".join(f"{p} {s:.2f}s" for p, s in rows))
    if a.json:
        a.json.write_text(json.dumps({"times": result, "imports": imports, "load": load}, indent=1))


if __name__ == "__main__":
    main()
