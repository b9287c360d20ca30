"""Quantized linear weights: held quantized in memory, turned into the compute dtype one layer at a time.

A model is built as usual; at load, each `nn.Linear` whose weight arrives quantized (from a GGUF file, or quantized
here tensor by tensor from a bfloat16/float32 checkpoint) is swapped for a `QuantLinear` under the same name, so
parameter names stay the checkpoint's keys and the model code never learns about formats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q
from torch import Tensor, nn

from .cpu import native_int8
from .gguf import GGUFEmbedding, GGUFTensor, by_pieces, dequantize, read_gguf
from .lowrank import Updates, add_updates
from .transformer import linear
from .weights import (Piece, TensorInfo, WeightsError, expected_shapes, human_bytes, load_pieces,
                      read_pieces, to_target)

log = logging.getLogger("zimage")

QUANTIZE = ("none", "int8", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
# int8 weights multiply int8 activations (per-row scales, made per call) where the CPU has int8 dot products: the
# product runs at 2x the bfloat16 rate there (VNNI); elsewhere an int8 weight is cast to the input's dtype
INT8_ACTIVATIONS = native_int8()


@dataclass(frozen=True)
class QWeight:
    """A quantized (out, in) weight: `fmt` is int8 or fp8 (with one float32 `scale` per output row) or a ggml type
    name (scales inside the blocks, `data` raw bytes)."""

    fmt: str
    shape: tuple[int, int]
    data: Tensor
    scale: Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * 4 if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra

    def chunk(self, n: int) -> list["QWeight"]:
        """Split along the output rows (a fused qkv into q, k, v), scales with their rows."""
        rows = self.shape[0] // n
        scales = self.scale.chunk(n) if self.scale is not None else [None] * n
        return [QWeight(self.fmt, (rows, self.shape[1]), d, sc) for d, sc in zip(self.data.chunk(n), scales)]


class QuantLinear(nn.Module):
    """A Linear whose weight stays quantized; each call makes the weight (or, for int8/fp8, the product) in the
    input's dtype, so only one layer's full-precision weight exists at a time."""

    def __init__(self, w: QWeight, bias: Tensor | None):
        super().__init__()
        self.fmt, self.out_features, self.in_features = w.fmt, *w.shape
        self.qtype = None if w.fmt in ("int8", "fp8") else Q[w.fmt]
        self.weight = nn.Parameter(w.data, requires_grad=False)
        self.weight_scale = nn.Parameter(w.scale, requires_grad=False) if w.scale is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.int8_activations = False  # int8 x int8 products on the CPU (see int8_product); set after loading

    # int8/fp8 run as cast + the usual product + per-row scale on the output. Measured on a 2-core Zen 5 CPU with
    # torch 2.13 (512x1536 @ 1536x4096): bfloat16 43 ms, the same as an unquantized product, while
    # torch.ops.aten._weight_int8pack_mm takes 92 ms (2253 ms for float32) and torchao 0.18's Int8WeightOnlyConfig,
    # which does run on the CPU, 68 ms (126 ms float32) and prints library load failures; torchao also quantizes
    # a module built in full precision first, and this model is never built that way.
    def forward(self, x: Tensor) -> Tensor:
        if self.qtype is not None:
            shape = (self.out_features, self.in_features)
            out = weight_buffer(shape, x.dtype) if x.device.type == "cpu" and not torch.compiler.is_compiling() else None
            return linear(x, dequantize(self.weight, self.qtype, shape, x.dtype, out), self.bias)
        if self.int8_activations and x.device.type == "cpu":
            y = int8_product(x, self.weight, self.weight_scale)
        else:  # per-row scales commute with the product: scale the (smaller) output instead
            y = linear(x, self.weight.to(x.dtype), None) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


_BUFFERS: dict[torch.dtype, Tensor] = {}


def weight_buffer(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """One CPU buffer per dtype (grown to the largest weight) that each GGUF layer dequantizes into in turn: a
    fresh 80 MB weight is mapped page fault by page fault on every call (glibc maps anything over 32 MB anew),
    measured at 45 ms of a real-size layer's 190 ms (Q8_0 + its product at 256x256). Read before the next call."""
    n = shape[0] * shape[1]
    if dtype not in _BUFFERS or _BUFFERS[dtype].numel() < n:
        _BUFFERS[dtype] = torch.empty(n, dtype=dtype)
    return _BUFFERS[dtype][:n]


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., K) -> int8 (M, K) and float32 scales (M, 1), symmetric per row (per token), round to nearest."""
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(-1, keepdim=True).float().div_(INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    # the scaling runs in the input's dtype: a float32 copy of bfloat16 activations costs 4x the time (memory-bound)
    q = (rows * scale.reciprocal().to(rows.dtype)).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_product(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ (weight * weight_scale).T with x quantized per row to int8 and an int8 x int8 -> int32 product
    (torch._int_mm, oneDNN with VNNI/AMX); result in x's dtype and shape."""
    q, scale = quantize_rows(x)
    y = torch._int_mm(q, weight.t())
    # one float32 pass beats mixed int32/bfloat16 arithmetic (measured 111 vs 148-289 ms at 4160x10240)
    y = y.float().mul_(scale).mul_(weight_scale).to(x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def quantize_int8(w: Tensor) -> QWeight:
    """Symmetric int8 per output row: w ~ q * scale, |q| <= 127 (round to nearest)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QWeight("int8", tuple(w.shape), q, scale)


def quantize_fp8(w: Tensor) -> QWeight:
    """float8 e4m3 per output row, each row scaled so that its largest magnitude maps to e4m3's maximum (448)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return QWeight("fp8", tuple(w.shape), (w / scale[:, None]).to(FP8), scale)


QUANTIZERS: dict[str, Callable[[Tensor], QWeight]] = {"int8": quantize_int8, "fp8": quantize_fp8}


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 weights are refused on `device`, or None. e4m3 needs CUDA capability 8.9 (Ada, Hopper) or later;
    elsewhere int8 stores the same bytes with a smaller error."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return None
        return f"this GPU (CUDA capability {major}.{minor}) has no fp8; fp8 needs 8.9 or later: use int8"
    return f"fp8 weights need a CUDA GPU with capability 8.9 or later, not {device.type}: use int8"


def linear_keys(module: nn.Module) -> dict[str, nn.Linear]:
    """`name.weight` -> the nn.Linear owning it, for every Linear in `module`."""
    return {f"{name}.weight": m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def install(module: nn.Module, state: dict[str, Tensor | QWeight | GGUFEmbedding]) -> nn.Module:
    """Fill a meta-device module from `state` (module keys -> tensors, QWeights or GGUFEmbeddings): each Linear
    whose weight is a QWeight becomes a QuantLinear under the same name, an Embedding whose weight is a
    GGUFEmbedding becomes that, everything else is assigned as is."""
    flat: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, (QWeight, GGUFEmbedding)):
            flat.setdefault(key, value)
            continue
        name = key.removesuffix(".weight")
        parent, _, child = name.rpartition(".")
        q = value if isinstance(value, GGUFEmbedding) else QuantLinear(value, state.get(f"{name}.bias"))
        setattr(module.get_submodule(parent) if parent else module, child, q)
        flat.update({f"{name}.{k}": v for k, v in q.state_dict(keep_vars=True).items()})
    module.load_state_dict(flat, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def load_quantized(module: nn.Module, header: dict[str, tuple[Path, TensorInfo]], pieces: dict[str, Piece],
                   dtype: torch.dtype, device: torch.device, fmt: str,
                   patch: Callable[[str, Tensor], Tensor] | None = None) -> nn.Module:
    """Like weights.load_pieces, quantizing every Linear weight to `fmt` the moment it is read (on `device`, so a
    GPU does the rounding), so the unquantized model never exists. `patch(key, weight)` (a LoRA merge) changes a
    weight before it is quantized."""
    quantize, linears = QUANTIZERS[fmt], linear_keys(module)

    def convert(key: str, t: Tensor) -> Tensor | QWeight:
        if patch is not None:
            t = patch(key, t)
        if key in linears:
            return quantize(t.to(device))
        return to_target(t, dtype, device)

    return install(module, read_pieces(header, pieces, convert))


def load_weights_of(module: nn.Module, comp, dtype: torch.dtype, device: torch.device,
                    quantize: str = "none", patch: Callable[[str, Tensor], Tensor] | None = None,
                    what: str = "model", int8_activations: bool = False) -> nn.Module:
    """Fill a meta-device module from a checked modelfiles.Component (only the pieces of keys `module` has): from
    its GGUF or ComfyUI fp8 file kept quantized, quantized to `quantize` while reading, or plainly in `dtype`;
    `patch` (a LoRA merge) changes weights before they are quantized; on a file stored quantized it is merged into
    the weights read as floats and computed beside the ones kept quantized (a lowrank.Updates, e.g.
    lora.LoraPatch). With `int8_activations`, int8 layers multiply int8 activations on a CPU that has int8 dot
    products. Quantized layers are logged as `what`."""
    module = _fill(module, comp, dtype, device, quantize, patch)
    if int8_activations and INT8_ACTIVATIONS:
        for m in module.modules():
            if isinstance(m, QuantLinear) and m.fmt == "int8":
                m.int8_activations = True
    if any(isinstance(m, QuantLinear) for m in module.modules()):
        log.info("%s: %s", what, describe(module))
    return module


def _fill(module: nn.Module, comp, dtype: torch.dtype, device: torch.device, quantize: str,
          patch: Callable[[str, Tensor], Tensor] | None) -> nn.Module:
    used = expected_shapes(module)
    pieces = {k: p for k, p in comp.pieces.items() if k in used}
    if comp.where.suffix.lower() == ".gguf":
        return beside(load_gguf(module, comp.where, pieces, dtype, device, patch), patch, dtype, device)
    if comp.where.is_file() and is_scaled_fp8(comp.header):
        return beside(load_scaled_fp8(module, comp.where, pieces, dtype, device, patch), patch, dtype, device)
    if quantize != "none":
        return load_quantized(module, comp.header, pieces, dtype, device, quantize, patch)
    return load_pieces(module, comp.header, pieces, dtype, device, patch)


SCALE_NAMES = ("scale_weight", "weight_scale")  # ComfyUI's older "scaled fp8" files, and newer ones
FP8_MARKERS = ("scaled_fp8",)  # an empty tensor that marks a scaled-fp8 file
FP8_DROPPED = ("scale_input", "input_scale", "comfy_quant")  # activation scales (weight-only here) and metadata


def read_scaled_fp8(path: Path) -> dict[str, Tensor | QWeight]:
    """The tensors of a ComfyUI fp8 safetensors file: each float8_e4m3fn `X.weight` with its `X.scale_weight` or
    `X.weight_scale` (one per tensor or per row) becomes a QWeight('fp8') kept in fp8; other tensors as stored.
    Raises WeightsError when an fp8 weight has no scale or the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names if n.rsplit(".", 1)[-1] not in SCALE_NAMES + FP8_DROPPED
                       and n not in FP8_MARKERS}
            scales = {n.rsplit(".", 1)[0]: f.get_tensor(n).float() for n in names
                      if n.rsplit(".", 1)[-1] in SCALE_NAMES}
    except Exception as e:
        raise WeightsError(f"{path} could not be read ({' '.join(str(e).split())}); download it again") from None
    out: dict[str, Tensor | QWeight] = {}
    for name, t in tensors.items():
        if t.dtype != FP8 or t.ndim != 2:
            out[name] = t
            continue
        base = name.removesuffix(".weight")
        if base not in scales:
            raise WeightsError(f"{path.name}: float8 tensor '{name}' has no scale_weight or weight_scale")
        scale = scales[base].reshape(-1).expand(t.shape[0]).contiguous() if scales[base].numel() == 1 \
            else scales[base].reshape(t.shape[0])
        out[name] = QWeight("fp8", tuple(t.shape), t, scale)
    return out


def beside(module: nn.Module, patch: Updates | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The module with `patch`'s updates of its quantized linears computed beside them (lowrank.py)."""
    if patch is not None and (n := add_updates(module, patch, QuantLinear, dtype, device)):
        log.info("LoRA: %d quantized layer(s) adapted beside their weights (low-rank, %s)", n,
                 str(dtype).removeprefix("torch."))
    return module


def _floats(patch: Updates | None, key: str, value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float tensor of a quantized file as loaded: with `patch`'s update merged in float32 first."""
    if patch is None or key not in patch.keys:
        return value.to(dtype)
    return patch(key, value.float()).to(dtype)


def load_scaled_fp8(module: nn.Module, path: Path, pieces: dict[str, Piece], dtype: torch.dtype,
                    device: torch.device, patch: Updates | None = None) -> nn.Module:
    """Fill a meta-device module from a ComfyUI fp8 file whose tensors `pieces` maps (checked by match_pieces) onto
    its keys, without upcasting it: Linear weights stay float8 with their scales (dequantized per tensor at load on
    MPS, which has no float8), everything else in `dtype`; `patch` merges into what is loaded as floats."""
    linears = linear_keys(module)
    state: dict[str, Tensor | QWeight] = {}
    for key, value in by_pieces(read_scaled_fp8(path), pieces).items():
        if isinstance(value, QWeight) and key in linears and device.type != "mps":
            state[key] = QWeight(value.fmt, value.shape, value.data.to(device), value.scale.to(device))
        elif isinstance(value, QWeight):
            state[key] = _floats(patch, key, value.data.float() * value.scale[:, None], dtype).to(device)
        else:
            state[key] = _floats(patch, key, value, dtype if value.is_floating_point() else value.dtype).to(device)
    return install(module, state)


def is_scaled_fp8(header: dict[str, tuple[Path, TensorInfo]]) -> bool:
    """Whether a safetensors header holds float8 weights (a ComfyUI fp8 file)."""
    return any(info.dtype.startswith("F8") and len(info.shape) == 2 for _, info in header.values())


def load_gguf(module: nn.Module, path: Path, pieces: dict[str, Piece], dtype: torch.dtype,
              device: torch.device, patch: Updates | None = None) -> nn.Module:
    """Fill a meta-device module from a GGUF file whose tensors `pieces` maps (checked by match_pieces) onto its
    keys: quantized Linear weights stay quantized (moved to `device`), float Linear weights are kept as stored when
    that is smaller than `dtype`, a quantized token embedding stays quantized (a GGUFEmbedding) unless `patch`
    changes it, every other tensor is dequantized to `dtype` (`patch` merged into it first)."""
    _, tensors = read_gguf(path)
    expected, linears = expected_shapes(module), linear_keys(module)
    embeddings = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    size = torch.tensor([], dtype=dtype).element_size()
    state: dict[str, Tensor | QWeight | GGUFEmbedding] = {}
    for key, value in by_pieces(tensors, pieces).items():
        keep = value.quantized or value.data.element_size() < size
        if key in linears and keep and value.rows_kept:
            state[key] = QWeight(value.qtype.name, value.shape, value.data.to(device))
        elif key in embeddings and value.quantized and value.rows_kept and not (patch and key in patch.keys):
            state[key] = GGUFEmbedding(GGUFTensor(value.qtype, value.shape, value.data.to(device)), dtype)
        else:
            floats = value.dequantize(torch.float32 if patch and key in patch.keys else dtype)
            state[key] = _floats(patch, key, floats.reshape(expected[key]), dtype).to(device)
    return install(module, state)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters hold, quantized ones as stored."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def describe(module: nn.Module) -> str:
    """'N linears quantized (fmt: count, ...), X in all' for log messages."""
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, QuantLinear):
            counts[m.fmt] = counts.get(m.fmt, 0) + 1
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    acts = any(m.int8_activations for m in module.modules() if isinstance(m, QuantLinear))
    extra = f"; int8 activations on the CPU ({INT8_ACTIVATIONS})" if acts else ""
    return f"{sum(counts.values())} linear layers quantized ({kinds}), {human_bytes(quantized_bytes(module))} in all{extra}"


def stored_quantized(files, name: str) -> tuple[Path, str] | None:
    """(file, format) when component `name` of a run's ModelFiles is stored quantized (a GGUF file, or a ComfyUI
    scaled-fp8 single file), from headers only; None otherwise."""
    from .modelfiles import gguf_source, weights_header

    if (path := gguf_source(files, name)) is not None:
        return path, "GGUF"
    path = files.file(name)
    if path is not None and path.is_file() and is_scaled_fp8(weights_header(files, name)):
        return path, "scaled fp8"
    return None
