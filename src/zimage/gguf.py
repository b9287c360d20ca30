"""GGUF files: reading them (memory-mapped, quantized tensors kept quantized) and ggml's dequantization in torch.

The dequantization follows ggml's block layouts (ggml-quants.c, gguf-py's numpy `quants.py`) in float32 with plain
torch ops, so it runs on CPU, CUDA and MPS alike (no float64, no uint32 arithmetic) and matches gguf-py bit for bit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader
from torch import Tensor, nn

from .weights import Piece, TensorInfo, WeightsError

QK_K = 256
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
FLOAT32 = Q.F32


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: `data` holds raw ggml blocks (uint8, one row of blocks per output row) for quantized
    types, or the values themselves for float types. `shape` is the logical torch shape (ggml's, reversed)."""

    qtype: Q
    shape: tuple[int, ...]
    data: Tensor
    rows_kept: bool = True  # False when the writer regrouped the values into other rows (ComfyUI's orig_shape)

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def chunk(self, n: int) -> list["GGUFTensor"]:
        """Split along dim 0 (output rows) without dequantizing: ggml blocks never cross rows."""
        if self.shape[0] % n:
            raise WeightsError(f"cannot split {self.shape[0]} rows into {n} equal parts")
        rows = self.shape[0] // n
        if not self.rows_kept:
            return [GGUFTensor(FLOAT32, (rows, *self.shape[1:]), d) for d in self.dequantize().chunk(n, dim=0)]
        return [GGUFTensor(self.qtype, (rows, *self.shape[1:]), d) for d in self.data.chunk(n, dim=0)]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype)


def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def _bits(b: Tensor, shifts: list[int], mask: int) -> Tensor:
    """(n, m) uint8 -> (n, len(shifts), m): each byte shifted right by each shift, masked."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, -1, 1)
    return (b.unsqueeze(1) >> s) & mask


def _u32_bits(b: Tensor) -> Tensor:
    """(n, 4) little-endian bytes -> (n, 32) bits as uint8 (int32 arithmetic: MPS has no uint32 shifts)."""
    x = b.to(torch.int32)
    word = x[:, 0] | x[:, 1] << 8 | x[:, 2] << 16 | x[:, 3] << 24
    return ((word.unsqueeze(1) >> torch.arange(32, device=b.device, dtype=torch.int32)) & 1).to(torch.uint8)


def _nibbles(qs: Tensor) -> Tensor:
    """(n, 16) packed nibbles -> (n, 32): the low nibbles first, then the high ones (ggml's legacy order)."""
    return _bits(qs, [0, 4], 0x0F).reshape(len(qs), -1)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5(b: Tensor) -> Tensor:
    """5-bit values of a Q5_0/Q5_1 block from its 4 high-bit bytes and 16 nibble bytes (the block's last 20)."""
    return _nibbles(b[:, -16:]) | (_u32_bits(b[:, -20:-16]) << 4)


def _q5_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_q5(b).to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _q5(b).float() + _f16(b[:, 2:4])


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins packed into 12 bytes (Q4_K, Q5_K)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q2_k(b: Tensor) -> Tensor:
    n = len(b)
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b[:, 80:82]) * (scales & 0xF).float()).view(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n * 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = len(b)
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _bits(s[:, :8], [0, 4], 0x0F).reshape(n, 16)
    high = _bits(s[:, 8:], [0, 2, 4, 6], 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b[:, 108:110]) * scales).view(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _bits(hmask, list(range(8)), 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    n = len(b)
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    q = _bits(b[:, 16:].reshape(n * 4, 32), [0, 4], 0x0F).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = len(b)
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n * 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], list(range(8)), 1).reshape(n, 8, 32)
    return (d * (ql | (qh << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = len(b)
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b[:, 208:210]) * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _bits(ql.reshape(n * 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _bits(qh.reshape(n * 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


BLOCK_DEQUANT: dict[Q, Callable[[Tensor], Tensor]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
SUPPORTED = frozenset(BLOCK_DEQUANT) | frozenset(FLOAT_TYPES)


# On the CPU a weight is dequantized this many values at a time into its output: the float32 temporaries of a
# chunk (a few MB) stay in malloc's heap and the cache, where a whole 10240 x 3840 weight's (hundreds of MB, above
# glibc's largest mmap threshold) are mapped afresh, page fault by page fault, for every layer of every step.
# Measured on a 2-core Zen 5 (torch 2.13, to bfloat16): Q4_0 366 -> 128 ms CPU, Q8_0 265 -> 75, Q4_K 415 -> 137.
CHUNK_VALUES = 2**19


def dequantize(data: Tensor, qtype: Q, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               out: Tensor | None = None) -> Tensor:
    """The values of a ggml tensor of logical `shape` stored as raw blocks (uint8) or floats, in `dtype`; on the
    CPU written into `out` (contiguous, as many values, `dtype`) when given.

    Computed in float32 and rounded once to `dtype`, as ggml does before its float kernels."""
    if qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks, per_block = data.reshape(-1, type_size), BLOCK_DEQUANT[qtype]
    step = max(1, CHUNK_VALUES // block_size)
    if data.device.type != "cpu" or (len(blocks) <= step and out is None):  # GPUs: one pass, not many launches
        return per_block(blocks).reshape(shape).to(dtype)
    out = torch.empty(len(blocks), block_size, dtype=dtype) if out is None else out.view(len(blocks), block_size)
    for i in range(0, len(blocks), step):
        out[i : i + step] = per_block(blocks[i : i + step])  # the same rounding to `dtype` as .to(dtype)
    return out.reshape(shape)


class GGUFEmbedding(nn.Module):
    """A token embedding kept as stored in a GGUF file (ggml blocks, one row per token): a lookup dequantizes only
    the rows it reads, into `dtype`, the same values as dequantizing the table whole. Qwen3-4B's 151936 x 2560
    table is 0.4 GB as Q8_0, 0.8 GB in bfloat16, and 1.6 GB more while dequantized whole at load in float32."""

    def __init__(self, t: GGUFTensor, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.out_dtype = t.qtype, dtype
        self.num_embeddings, self.embedding_dim = t.shape
        self.weight = nn.Parameter(t.data, requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight[ids.reshape(-1)]
        out = dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim), self.out_dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def _as_tensor(array: np.ndarray) -> Tensor:
    with warnings.catch_warnings():  # the memory map is read-only; nothing ever writes to these tensors
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _field_str(reader: GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError):
        return None


def read_gguf(path: Path, architectures: tuple[str, ...] | None = None) -> tuple[str | None, dict[str, GGUFTensor]]:
    """The architecture (`general.architecture`) and tensors of a GGUF file, memory-mapped, never dequantized.

    Raises WeightsError for a damaged or truncated file, an architecture not in `architectures` (when given),
    or a tensor type this module cannot dequantize."""
    if not path.is_file():
        from .weights import MissingFileError

        raise MissingFileError(f"missing {path}")
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors for garbage and short files
        raise WeightsError(f"{path} is not a readable GGUF file ({' '.join(str(e).split()) or type(e).__name__}); "
                           "download it again") from None
    arch = _field_str(reader, "general.architecture")
    if architectures is not None and arch not in architectures:
        raise WeightsError(f"{path} is a GGUF file for architecture '{arch}', not "
                           f"{' or '.join(repr(a) for a in architectures)}")
    out: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED:
            raise WeightsError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which zimage cannot read "
                               f"(supported: {', '.join(sorted(q.name for q in SUPPORTED))})")
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = _orig_shape(reader, t.name) or stored
        data = _as_tensor(t.data)
        if t.tensor_type == Q.BF16:  # gguf-py hands bfloat16 over as raw bytes
            data = data.view(torch.bfloat16).reshape(stored)
        if math.prod(shape) != math.prod(stored):
            raise WeightsError(f"{path}: tensor '{t.name}' has {math.prod(stored)} values, its recorded original "
                               f"shape {list(shape)} has {math.prod(shape)}")
        out[t.name] = GGUFTensor(Q(t.tensor_type), shape, data, rows_kept=shape == stored)
    return arch, out


def _orig_shape(reader: GGUFReader, name: str) -> tuple[int, ...] | None:
    """The shape ComfyUI-GGUF's converter recorded for a tensor it regrouped into rows of 256 (`shape_fix`)."""
    field = reader.fields.get(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)



# Original / ComfyUI transformer names, for writing files in that layout (singlefile.py maps them to ours).
TRANSFORMER_RENAMES = (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1."),
                       (".attention.out.", ".attention.to_out.0."), (".attention.k_norm.", ".attention.norm_k."),
                       (".attention.q_norm.", ".attention.norm_q."))
ARCHITECTURES = {"transformer": "lumina2", "text_encoder": "qwen3"}


def gguf_header(path: Path, component: str) -> dict[str, tuple[Path, TensorInfo]]:
    """The tensors of a GGUF file holding `component` as weights.checkpoint_header gives them for safetensors:
    dtype the ggml type name, logical shape, bytes as stored (reads the header, no tensor data)."""
    if component not in ARCHITECTURES:
        raise WeightsError(f"{path}: zimage reads GGUF files for the transformer and the text encoder only")
    _, tensors = read_gguf(path, (ARCHITECTURES[component],))
    return {name: (path, TensorInfo(t.qtype.name, t.shape, t.nbytes if t.quantized else None))
            for name, t in tensors.items()}


def pieces_of(component: str) -> Callable[[str], dict[str, Piece]]:
    """Our module key(s) for one tensor name of a GGUF file holding `component`."""
    if component == "transformer":
        from .singlefile import transformer_pieces_of

        return transformer_pieces_of
    return llama_cpp_pieces_of


def by_pieces(tensors: dict, pieces: dict[str, Piece]) -> dict:
    """Module key -> tensor (or GGUFTensor, QWeight: anything with chunk) for each piece, slices split off."""
    return {key: tensors[p.name].chunk(p.parts)[p.part] if p.parts > 1 else tensors[p.name]
            for key, p in pieces.items()}


def transformer_keys(tensors: dict) -> dict:
    """Tensors of an original/ComfyUI transformer file under our keys (fused qkv split), via singlefile's mapping."""
    from .singlefile import transformer_pieces_of

    return by_pieces(tensors, {k: p for name in tensors for k, p in transformer_pieces_of(name).items()})


def original_transformer_names(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(original name, our keys concatenated into it, in order) for each tensor of an original-layout transformer
    file: the inverse of `transformer_keys`' renames, to_q/to_k/to_v fused into attention.qkv."""
    out = []
    for key in keys:
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        name = key
        for old, new in TRANSFORMER_RENAMES:
            name = name.replace(new, old)
        if ".attention.to_q." in key:
            out.append((name.replace(".to_q.", ".qkv."), [key.replace("to_q", p) for p in ("to_q", "to_k", "to_v")]))
        else:
            out.append((name, [key]))
    return out


def original_transformer_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `transformer_keys` for float tensors: our keys -> original names, to_q/k/v fused into qkv
    (for writing GGUF files that tools of the original layout read)."""
    return {name: state[keys[0]] if len(keys) == 1 else torch.cat([state[k] for k in keys])
            for name, keys in original_transformer_names(list(state))}


# llama.cpp's names for Qwen3 (gguf-py tensor_mapping) -> transformers' Qwen3Model names. llama.cpp permutes the
# q/k rows of llama-architecture files only; qwen3 files keep Hugging Face's order (transformers' GGUF loader
# reverses the permutation for "llama" alone), so no un-permuting here.
QWEN3_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                     "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
                     "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
QWEN3_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}


def llama_cpp_pieces_of(name: str) -> dict[str, Piece]:
    """Our (Qwen3Model) key for one tensor of a llama.cpp Qwen3 GGUF; the output head (tied to the embeddings
    in Qwen3-4B) and rope tables are not used."""
    if name in QWEN3_NAMES:
        return {QWEN3_NAMES[name]: Piece(name)}
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in QWEN3_LAYER_NAMES:
        return {f"layers.{parts[1]}.{QWEN3_LAYER_NAMES[parts[2]]}.{parts[3]}": Piece(name)}
    return {} if name.startswith(("output.", "rope_freqs.")) else {name: Piece(name)}
