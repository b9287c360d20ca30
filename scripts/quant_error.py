#!/usr/bin/env python3
"""How much each weight quantization changes the transformer output and the image, and what dequantizing costs.

    .venv/bin/python scripts/quant_error.py CONFIG [--model-path DIR] [--types bf16,int8,...] [--image]
                                                   [--size 256] [--steps 8] [--timing] [--json FILE]

CONFIG is tiny or mid (bench-cache/CONFIG, written by scripts/make_checkpoint.py when missing). For each type,
the transformer is loaded the way a run loads it (GGUF types: a GGUF file in the original layout written here
with gguf-py's quantizer, the other components linked; int8/fp8: `--quantize` while loading; bf16: the
checkpoint rounded to bfloat16) and its output on one fixed input is compared with the float32 checkpoint's,
all computed in float32 so that only the weights differ: relative error = ||y - y_ref|| / ||y_ref||.
fp8 is measured on the CPU by casting (the run refuses fp8 without a GPU that has it; the rounding is the same).
With --image, one full run per type (float32 compute) is compared with the float32 run: mean/max |difference| of
the 8-bit pixels. With --timing, the dequantization of one real-size weight (10240 x 3840, the published
feed-forward) is timed per GGUF type next to the product it feeds (a 256x256 image's 320 tokens), which covers
the K types that gguf-py cannot write.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quants  # noqa: E402
from safetensors import safe_open  # noqa: E402

import zimage.quant  # noqa: E402
from zimage.gguf import dequantize, original_transformer_keys  # noqa: E402
from zimage.pipeline import load_transformer  # noqa: E402
from zimage.weights import WEIGHT_STEMS, checkpoint_header  # noqa: E402

GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # the ones gguf-py can quantize
ALL_TYPES = ("bf16", "int8", "int8w", "fp8", *GGUF_TYPES)  # int8w: int8 weights only (see variant)
TIMED = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")


def read_state(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, (path, _) in checkpoint_header(model / "transformer", WEIGHT_STEMS["transformer"]).items():
        with safe_open(str(path), framework="pt") as f:
            out[name] = f.get_tensor(name).float()
    return out


def gguf_variant(model: Path, qtype: str, root: Path) -> Path:
    """`model` with its transformer as a GGUF file: `qtype` for every matrix whose rows fit its blocks, F32 else."""
    out = root / f"{model.name}-{qtype}"
    if (out / "transformer" / "model.gguf").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "transformer").mkdir(parents=True)
    for item in model.iterdir():
        if item.name != "transformer":
            (out / item.name).symlink_to(item.resolve())
    shutil.copy(model / "transformer" / "config.json", out / "transformer" / "config.json")
    writer = GGUFWriter(str(out / "transformer" / "model.gguf.part"), "lumina2")
    block = GGML_QUANT_SIZES[Q[qtype]][0]
    for name, t in original_transformer_keys(read_state(model)).items():
        arr = t.numpy()
        if t.ndim == 2 and t.shape[0] > 1 and t.shape[1] % block == 0:
            writer.add_tensor(name, quants.quantize(arr, Q[qtype]), raw_dtype=Q[qtype])
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (out / "transformer" / "model.gguf.part").rename(out / "transformer" / "model.gguf")
    return out


def bf16_variant(model: Path, root: Path) -> Path:
    from zimage.weights import save_weights

    out = root / f"{model.name}-bf16"
    if not (out / "transformer" / f"{WEIGHT_STEMS['transformer']}.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)
        (out / "transformer").mkdir(parents=True)
        for item in model.iterdir():
            if item.name != "transformer":
                (out / item.name).symlink_to(item.resolve())
        shutil.copy(model / "transformer" / "config.json", out / "transformer" / "config.json")
        state = {k: v.bfloat16() for k, v in read_state(model).items()}
        save_weights(state, out / "transformer", WEIGHT_STEMS["transformer"])
    return out


def variant(model: Path, kind: str, root: Path) -> tuple[Path, str]:
    """(model folder, --quantize value) that makes a run of this kind. int8 multiplies int8 activations where the
    CPU has VNNI/AMX (zimage.quant.INT8_ACTIVATIONS); int8w keeps the activations in the compute dtype."""
    if kind in ("int8", "fp8"):
        return model, kind
    if kind == "int8w":
        return model, "int8"
    if kind == "bf16":
        return bf16_variant(model, root), "none"
    return gguf_variant(model, kind, root), "none"


@torch.inference_mode()
def output_error(model: Path, kinds: list[str], root: Path, latent: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    ref_model = load_transformer(model, cpu, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, latent, latent, generator=gen), torch.rand(1, generator=gen)
    caps = [torch.randn(40, ref_model.cfg.cap_feat_dim, generator=gen)]
    ref = ref_model(x, t, caps).double()
    del ref_model
    out = {}
    for kind in kinds:
        folder, quantize = variant(model, kind, root)
        activations = zimage.quant.INT8_ACTIVATIONS
        zimage.quant.INT8_ACTIVATIONS = None if kind == "int8w" else activations
        y = load_transformer(folder, cpu, torch.float32, quantize)(x, t, caps).double()
        zimage.quant.INT8_ACTIVATIONS = activations
        out[kind] = ((y - ref).norm() / ref.norm()).item()
        print(f"{kind:>6}: transformer output relative error {out[kind]:.2e}", flush=True)
    return out


def run_image(folder: Path, quantize: str, png: Path, size: int, steps: int) -> np.ndarray:
    cmd = [str(Path(sys.executable).parent / "zimage"), "generate", "--model-path", str(folder), "--cpu",
           "--dtype", "float32", "--width", str(size), "--height", str(size), "--num-steps", str(steps),
           "--seed", "42", "-q", "--overwrite", "-o", str(png), "--quantize", quantize,
           "-p", "A red fox in a snowy birch forest at dawn"]
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    from PIL import Image

    return np.asarray(Image.open(png), dtype=np.int16)


def image_error(model: Path, kinds: list[str], root: Path, size: int, steps: int) -> dict[str, dict]:
    ref = run_image(model, "none", root / "ref.png", size, steps)
    out = {}
    for kind in kinds:
        folder, quantize = variant(model, kind, root)
        if kind in ("fp8", "int8w"):
            continue  # the run refuses fp8 on the CPU; int8 runs with int8 activations where the CPU has them
        diff = np.abs(run_image(folder, quantize, root / f"{kind}.png", size, steps) - ref)
        out[kind] = {"mean": float(diff.mean()), "max": int(diff.max())}
        print(f"{kind:>6}: image vs float32: mean |diff| {diff.mean():.2f}, max {diff.max()} (of 255)", flush=True)
    return out


def timing(dtype: torch.dtype, rows: int = 10240, cols: int = 3840, tokens: int = 320) -> dict[str, float]:
    """Milliseconds to dequantize one rows x cols weight (random valid blocks) to `dtype`, and for the product."""
    rng = np.random.default_rng(0)
    x = torch.randn(tokens, cols, dtype=dtype)
    w = torch.randn(rows, cols, dtype=dtype)
    out = {}

    def best(f) -> float:
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    out["matmul"] = best(lambda: torch.nn.functional.linear(x, w))
    for name in TIMED:
        qtype = Q[name]
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
        data = torch.from_numpy(raw)
        out[name] = best(lambda: dequantize(data, qtype, (rows, cols), dtype))
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    out["int8"] = best(lambda: torch.nn.functional.linear(x, q.to(dtype)))  # cast + product (scale on output)
    print(f"{str(dtype):>15}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in out.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="tiny or mid (or a label with --model-path)")
    ap.add_argument("--model-path")
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--latent", type=int, default=32, help="latent side of the output test (32 = 256 px)")
    ap.add_argument("--image", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = Path(a.model_path or ROOT / "bench-cache" / a.config)
    if not model.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), a.config, "--out", str(model)],
                       check=True)
    root = ROOT / "bench-cache" / "quant"
    root.mkdir(parents=True, exist_ok=True)
    kinds = a.types.split(",")
    result = {"config": a.config, "output_rel_err": output_error(model, kinds, root, a.latent)}
    if a.image:
        result["image"] = image_error(model, kinds, root, a.size, a.steps)
    if a.timing:
        result["dequant_ms"] = {str(dt): timing(dt) for dt in (torch.bfloat16, torch.float32)}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
