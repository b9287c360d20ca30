"""Choosing the device, the dtype and the offload mode, and checking that a run fits in memory before loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import os

import psutil
import torch

from .cpu import native_bf16
from .errors import UsageError
from .libc import LIBC
from .modelfiles import ModelFiles, component, weights_header
from .singlefile import strip_prefix
from .weights import TensorInfo, human_bytes

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it
TRIM_THRESHOLD = 256 * 2**20


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap for reuse (glibc only; a no-op elsewhere or when the user set
    MALLOC_* variables). Otherwise glibc hands big buffers back to the OS on every free and maps them again,
    page fault by page fault, on every step (measured: 15% of a CPU step at the mid benchmark size)."""
    if LIBC is None or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        return bool(LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except AttributeError:  # not glibc (musl, for one, has no mallopt)
        return False


def trim_host() -> None:
    """Hand the free parts of the heap back to the OS (glibc's malloc_trim; a no-op elsewhere): freed tensors under
    glibc's 32 MB mmap threshold (most of the text encoder's weights) otherwise stay resident in the heap."""
    try:
        if LIBC is not None:
            LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


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


def cpu_dtype(float32_peak: int) -> tuple[torch.dtype, str]:
    """What `--dtype auto` runs on the CPU, and why: bfloat16 where the CPU computes it natively or where float32
    (needing `float32_peak` bytes) would not fit in the free memory, else float32."""
    if feature := native_bf16():
        return torch.bfloat16, f"the CPU computes bfloat16 natively ({feature}); --dtype float32 for full precision"
    free = available_bytes(torch.device("cpu"))
    if float32_peak > free:
        return torch.bfloat16, (f"float32 would need about {human_bytes(float32_peak)} and {human_bytes(free)} is "
                                "free")
    return torch.float32, "this CPU has no native bfloat16"


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

    def host(self, offload: str) -> int:
        """Peak bytes of host RAM that an offload mode keeps the weights in while computing on a GPU (without
        offload, weights go straight to the GPU tensor by tensor). Sequential streaming pins its blocks in
        exactly sized buffers, so its weights take their own size."""
        if offload == "none":
            return 0
        if offload == "model":  # the text encoder loads straight onto the GPU
            return self.transformer + self.vae
        return max(self.text_encoder, self.transformer + self.vae)


def weight_bytes(header: dict[str, tuple[Path, TensorInfo]], dtype: torch.dtype,
                 quantize: str = "none") -> tuple[int, int]:
    """(bytes of all tensors in `dtype`, bytes of the largest transformer-block group) from the file headers;
    quantized weights (GGUF blocks, or the matrices under `quantize` int8/fp8) count as they are held."""
    size = torch.tensor([], dtype=dtype).element_size()
    per_block: dict[str, int] = {}
    total = 0
    for name, (_, info) in header.items():
        matrix = len(info.shape) == 2 and info.shape[0] > 1 and (quantize != "none" or info.dtype.startswith("F8"))
        n = info.stored if info.stored is not None else info.numel * (1 if matrix else size)
        total += n
        parts = strip_prefix(name, ("model.diffusion_model.", "diffusion_model.", "model.")).split(".")
        if len(parts) > 2 and parts[0] in ("layers", "noise_refiner", "context_refiner"):
            key = ".".join(parts[:2])
            per_block[key] = per_block.get(key, 0) + n
    return total, max(per_block.values(), default=0)


def decode_work(batch: int, width: int, height: int, tile: int | None, scale: int = 8) -> int:
    """Working bytes of a VAE decode: a few full-resolution 128-channel float32 maps; with `tile` (latent pixels
    per tile side) those maps are a tile's, plus the whole image's float32 blend buffers and the latent-resolution
    512-channel maps of the mid block."""
    if tile is None:
        return batch * 128 * height * width * 4 * 6
    side_h, side_w = min(height, tile * scale), min(width, tile * scale)
    blend = (2 * 3 * batch + 1) * height * width * 4
    mid = batch * 512 * (height // scale) * (width // scale) * 4 * 4
    return batch * 128 * side_h * side_w * 4 * 6 + blend + mid


def estimate(source: ModelFiles | Path, dtype: torch.dtype, width: int, height: int, batch: int, cfg_on: bool,
             vae_tile: int | None = None, quantize: str = "none", quantize_text_encoder: str = "none") -> Needs:
    """What a run needs, from the file headers and the transformer config of a folder or a run's ModelFiles."""
    files = ModelFiles.of(source)
    te, _ = weight_bytes(weights_header(files, "text_encoder"), dtype, quantize_text_encoder)
    tr, block = weight_bytes(weights_header(files, "transformer"), dtype, quantize)
    vae, _ = weight_bytes(weights_header(files, "vae"), torch.float32)
    tcfg = component(files, "transformer").config
    rows = batch * (2 if cfg_on else 1)
    tokens = (height // 16) * (width // 16) + 512
    elem = torch.tensor([], dtype=dtype).element_size()
    denoise_work = rows * tokens * tcfg.dim * elem * 24  # a block's live activations, with SwiGLU's wide hidden
    return Needs(te, tr, block, vae, denoise_work, decode_work(batch, width, height, vae_tile))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return host_available()


def host_available() -> int:
    """Bytes of host RAM available without swapping."""
    return psutil.virtual_memory().available


def choose_offload(needs: Needs, device: torch.device, dtype: torch.dtype,
                   requested: str | None) -> tuple[str, str | None]:
    """The offload mode to use and a note when it was chosen automatically: the lightest mode (none, then model,
    then sequential) whose GPU memory and host RAM both fit. Raises UsageError when even the leanest mode cannot
    fit, saying how much is needed and what helps."""
    free = available_bytes(device)
    lighter = "--dtype bfloat16, " if dtype == torch.float32 else ""
    if device.type != "cuda":
        peak = needs.peak("none")  # offloading to the CPU saves nothing when computing there
        if peak > free:
            raise UsageError(f"not enough memory: this run needs about {human_bytes(peak)} on {device.type} and "
                             f"{human_bytes(free)} is free; use {lighter}a smaller --width/--height, "
                             "a smaller --batch-size, or a machine with more memory")
        return requested or "none", None
    host = host_available()
    if requested:
        if needs.peak(requested) > free:
            raise UsageError(f"not enough GPU memory for --offload {requested}: about "
                             f"{human_bytes(needs.peak(requested))} needed, {human_bytes(free)} free; try "
                             f"{'--offload sequential, ' if requested != 'sequential' else ''}{lighter}"
                             "a smaller size or --batch-size 1")
        if needs.host(requested) > host:
            raise UsageError(host_message(needs, requested, host, lighter))
        return requested, None
    for mode in ("none", "model", "sequential"):
        if needs.peak(mode) <= free and needs.host(mode) <= host:
            note = None if mode == "none" else (
                f"the models do not all fit in {human_bytes(free)} of free GPU memory; using --offload {mode}")
            return mode, note
    if needs.peak("sequential") <= free:
        raise UsageError(host_message(needs, "sequential", host, lighter))
    raise UsageError(f"not enough GPU memory: even --offload sequential needs about "
                     f"{human_bytes(needs.peak('sequential'))} and {human_bytes(free)} is free; use {lighter}"
                     "a smaller --width/--height, --batch-size 1, or --cpu")


def host_message(needs: Needs, mode: str, host: int, lighter: str) -> str:
    return (f"not enough host memory (RAM) for --offload {mode}: it keeps the weights in RAM, about "
            f"{human_bytes(needs.host(mode))}, and {human_bytes(host)} is available; use {lighter}"
            "a machine with more RAM, or close other programs")
