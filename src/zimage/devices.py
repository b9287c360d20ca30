"""Choosing the device, the dtype and the offload mode, and checking that a run fits in memory before loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ctypes
import ctypes.util
import os
import sys

import psutil
import torch

from .jobs import UsageError
from .transformer import TransformerConfig
from .weights import WEIGHT_STEMS, checkpoint_header, find_gguf, human_bytes

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it
TRIM_THRESHOLD = 256 * 2**20


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap for reuse (glibc only; a no-op elsewhere or when the user set
    MALLOC_* variables). Otherwise glibc hands big buffers back to the OS on every free and maps them again,
    page fault by page fault, on every step (measured: 15% of a CPU step at the mid benchmark size)."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, for one, has no mallopt)
        return False


def pick_device(name: str | None, cpu: bool) -> torch.device:
    """`--cpu` wins; else the named device; else cuda, then mps, then cpu."""
    if cpu:
        return torch.device("cpu")
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available to PyTorch here; use --cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device mps: Apple MPS is not available here; use --cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise UsageError(f"unsupported device '{name}'; use cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device, force: bool) -> torch.dtype:
    """bfloat16 on GPUs and float32 on the CPU unless named; float16 only with `force`, since it overflows."""
    if not name or name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; use auto, bfloat16 or float32")
    dtype = DTYPES[name]
    if dtype == torch.float16 and not force:
        raise UsageError("--dtype float16 is refused: Z-Image's activations overflow float16 (NaN, black images); "
                         "use bfloat16, or add --force to try anyway")
    return dtype


def quantize_problem(fmt: str, device: torch.device) -> str | None:
    """Why weights cannot be quantized to `fmt` on `device` (an unknown name, fp8 without hardware), or None."""
    from .quant import QUANTIZE, fp8_problem

    if fmt not in QUANTIZE:
        return f"unknown quantization '{fmt}'; use {', '.join(QUANTIZE)}"
    return fp8_problem(device) if fmt == "fp8" else None


@dataclass(frozen=True)
class Needs:
    """Bytes each stage needs: weights in the run's dtype plus working memory."""

    text_encoder: int
    transformer: int
    block: int
    vae: int
    denoise_work: int
    decode_work: int

    def peak(self, offload: str) -> int:
        """Peak bytes on the compute device for an offload mode."""
        if offload == "none":
            return max(self.text_encoder, self.transformer + self.vae + max(self.denoise_work, self.decode_work))
        if offload == "model":
            return max(self.text_encoder, self.transformer + self.denoise_work, self.vae + self.decode_work)
        return max(self.text_encoder // 8, 2 * self.block + (self.transformer // 50) + self.denoise_work,
                   self.vae + self.decode_work)


def weight_bytes(folder: Path, stem: str, dtype: torch.dtype, quantize: str = "none") -> tuple[int, int]:
    """(bytes of all tensors in `dtype`, bytes of the largest transformer-block group) from the file headers;
    quantized weights (a GGUF file, or `quantize` int8/fp8 for the matrices) count as they are held."""
    size = torch.tensor([], dtype=dtype).element_size()
    if (gguf := find_gguf(folder, stem)) is not None:
        from .gguf import held_bytes

        sizes = held_bytes(gguf, size)
    else:
        sizes = {name: info.numel * (1 if quantize != "none" and len(info.shape) == 2 and info.shape[0] > 1 else size)
                 for name, (_, info) in checkpoint_header(folder, stem).items()}
    per_block: dict[str, int] = {}
    for name, n in sizes.items():
        parts = name.removeprefix("model.diffusion_model.").removeprefix("model.").split(".")
        if len(parts) > 2 and parts[0] in ("layers", "noise_refiner", "context_refiner"):
            key = ".".join(parts[:2])
            per_block[key] = per_block.get(key, 0) + n
    return sum(sizes.values()), max(per_block.values(), default=0)


def estimate(model_path: Path, dtype: torch.dtype, width: int, height: int, batch: int, cfg_on: bool,
             quantize: str = "none", quantize_text_encoder: str = "none") -> Needs:
    te, _ = weight_bytes(model_path / "text_encoder", WEIGHT_STEMS["text_encoder"], dtype, quantize_text_encoder)
    tr, block = weight_bytes(model_path / "transformer", WEIGHT_STEMS["transformer"], dtype, quantize)
    vae, _ = weight_bytes(model_path / "vae", WEIGHT_STEMS["vae"], torch.float32)
    tcfg = TransformerConfig.from_json(model_path / "transformer" / "config.json")
    rows = batch * (2 if cfg_on else 1)
    tokens = (height // 16) * (width // 16) + 512
    elem = torch.tensor([], dtype=dtype).element_size()
    denoise_work = rows * tokens * tcfg.dim * elem * 24  # a block's live activations, with SwiGLU's wide hidden
    decode_work = batch * 128 * height * width * 4 * 6  # a few full-resolution 128-channel float32 maps
    return Needs(te, tr, block, vae, denoise_work, decode_work)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def choose_offload(needs: Needs, device: torch.device, dtype: torch.dtype,
                   requested: str | None) -> tuple[str, str | None]:
    """The offload mode to use and a note when it was chosen automatically. Raises UsageError when even the
    leanest mode cannot fit, saying how much is needed and what helps."""
    free = available_bytes(device)
    lighter = "--dtype bfloat16, " if dtype == torch.float32 else ""
    if device.type != "cuda":
        peak = needs.peak("none")  # offloading to the CPU saves nothing when computing there
        if peak > free:
            raise UsageError(f"not enough memory: this run needs about {human_bytes(peak)} on {device.type} and "
                             f"{human_bytes(free)} is free; use {lighter}a smaller --width/--height, "
                             "a smaller --batch-size, or a machine with more memory")
        return requested or "none", None
    if requested:
        if needs.peak(requested) > free:
            raise UsageError(f"not enough GPU memory for --offload {requested}: about "
                             f"{human_bytes(needs.peak(requested))} needed, {human_bytes(free)} free; try "
                             f"{'--offload sequential, ' if requested != 'sequential' else ''}{lighter}"
                             "a smaller size or --batch-size 1")
        return requested, None
    for mode in ("none", "model", "sequential"):
        if needs.peak(mode) <= free:
            note = None if mode == "none" else (
                f"the models do not all fit in {human_bytes(free)} of free GPU memory; using --offload {mode}")
            return mode, note
    raise UsageError(f"not enough GPU memory: even --offload sequential needs about "
                     f"{human_bytes(needs.peak('sequential'))} and {human_bytes(free)} is free; use {lighter}"
                     "a smaller --width/--height, --batch-size 1, or --cpu")
