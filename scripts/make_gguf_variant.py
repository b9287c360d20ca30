#!/usr/bin/env python3
"""A copy of a checkpoint folder whose transformer and/or text encoder are GGUF files, written tensor by tensor.

    .venv/bin/python scripts/make_gguf_variant.py MODEL --out DIR [--transformer TYPE] [--text-encoder TYPE]

For scripts/bench.py's quantized rows (`--model-path DIR`): DIR gets transformer/model.gguf (original/ComfyUI key
names, fused attention.qkv, architecture lumina2, as published for Z-Image-Turbo) and/or text_encoder/model.gguf
(llama.cpp's Qwen3 names and metadata), each with the component's config.json; every other component is a
symlink to MODEL's (or --others'). A component given no TYPE is linked as it is.

TYPE is a ggml type. Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 are quantized from the weights with gguf-py's quantizer.
gguf-py cannot quantize K types (Q2_K ... Q6_K): those are written as random blocks with finite float16 scales of
about the weights' size, so their load time, step time and memory are right but their images mean nothing.
Matrices whose rows do not fit the type's blocks, and all vectors, are stored as F32.

The source is never held whole: one tensor at a time is read (safetensors safe_open), quantized and appended,
so the published-size model (a 24.6 GB float32 transformer) converts in a few GB of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quants  # noqa: E402
from safetensors import safe_open  # noqa: E402

from zimage.gguf import QWEN3_LAYER_NAMES, QWEN3_NAMES, dequantize, original_transformer_names  # noqa: E402
from zimage.weights import WEIGHT_STEMS, checkpoint_header  # noqa: E402

WRITABLE = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")  # what gguf-py's quantizer does
RANDOM = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the float16 scale fields (d, dmin) in one block of each K type
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
ARCH = {"transformer": "lumina2", "text_encoder": "qwen3"}


LLAMA_CPP = {v: k for k, v in QWEN3_LAYER_NAMES.items()}
LLAMA_CPP_TOP = {v: k for k, v in QWEN3_NAMES.items()}


def text_encoder_plan(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(llama.cpp name, [our key]) for each tensor of a Qwen3 text encoder (`model.` prefixes dropped; a separate
    lm_head, which Qwen3-4B ties to the embeddings, is not written)."""
    out = []
    for key in keys:
        bare = key.removeprefix("model.")
        if bare.startswith("lm_head."):
            continue
        if bare in LLAMA_CPP_TOP:
            out.append((LLAMA_CPP_TOP[bare], [key]))
            continue
        _, n, rest = bare.split(".", 2)
        module, param = rest.rsplit(".", 1)
        out.append((f"blk.{n}.{LLAMA_CPP[module]}.{param}", [key]))
    return out


def stored_type(shape: tuple[int, ...], qtype: Q) -> Q:
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if len(shape) == 2 and shape[0] > 1 and shape[1] % block == 0 else Q.F32


def random_k_blocks(shape: tuple[int, int], qtype: Q, seed: int) -> np.ndarray:
    """Random `qtype` blocks for a (rows, cols) matrix, float16 scales set so that the values' RMS is about
    1/sqrt(cols) (the size of the checkpoint's weights): finite and forward-safe, not the weights."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(shape[0] * shape[1] // block, size), dtype=np.uint8)
    for off in K_SCALES[qtype]:
        raw[:, off : off + 2] = np.full(len(raw), 1.0, np.float16).view(np.uint8).reshape(-1, 2)
    sample = dequantize(torch.from_numpy(raw[:64].copy()), qtype, (64, block))
    factor = (1 / math.sqrt(shape[1])) / float(sample.pow(2).mean().sqrt())
    for off in K_SCALES[qtype]:
        scale = (rng.standard_normal(len(raw)) * factor).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(shape[0], -1)


def quantize_rows(t: torch.Tensor, qtype: Q, chunk: int = 2**24) -> np.ndarray:
    """gguf-py's quantization of a matrix, a few rows at a time: its numpy temporaries are several times the
    input's float32 size, which for the 151936 x 2560 token embedding would be many GB."""
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.empty((t.shape[0], t.shape[1] // block * size), np.uint8)
    rows = max(1, chunk // t.shape[1])
    for r in range(0, t.shape[0], rows):
        out[r : r + rows] = quants.quantize(t[r : r + rows].float().numpy(), qtype)
    return out


def add_qwen3_metadata(writer: GGUFWriter, cfg: dict) -> None:
    """The llama.cpp metadata of a Qwen3 GGUF (as tests/test_gguf.py writes it)."""
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])


def write_component(src: Path, dst: Path, name: str, qtype: Q) -> None:
    """src/name (safetensors, any shards) -> dst/name/model.gguf with `qtype`, streamed one tensor at a time."""
    header = checkpoint_header(src / name, WEIGHT_STEMS[name])
    keys = sorted(header)
    plan = (original_transformer_names if name == "transformer" else text_encoder_plan)(keys)
    (dst / name).mkdir(parents=True)
    cfg_text = (src / name / "config.json").read_text()
    (dst / name / "config.json").write_text(cfg_text)
    part = dst / name / "model.gguf.part"
    writer = GGUFWriter(str(part), ARCH[name])
    if name == "text_encoder":
        add_qwen3_metadata(writer, json.loads(cfg_text))
    shapes = {}
    for out_name, sources in plan:
        first = header[sources[0]][1].shape
        shape = (sum(header[s][1].shape[0] for s in sources), *first[1:])
        kind = stored_type(shape, qtype)
        block, size = GGML_QUANT_SIZES[kind]
        nbytes = math.prod(shape) // block * size
        byte_shape = (*shape[:-1], shape[-1] // block * size) if kind != Q.F32 else shape
        writer.add_tensor_info(out_name, byte_shape, np.dtype(np.uint8 if kind != Q.F32 else np.float32), nbytes,
                               raw_dtype=kind if kind != Q.F32 else None)
        shapes[out_name] = (shape, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, object] = {}
    t0 = time.perf_counter()
    for i, (out_name, sources) in enumerate(plan):
        shape, kind = shapes[out_name]
        if kind in K_SCALES:  # random blocks: the source's values are not needed
            writer.write_tensor_data(random_k_blocks(shape, kind, i))
            continue
        parts = []
        for key in sources:
            path = header[key][0]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            parts.append(handles[path].get_tensor(key))
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        writer.write_tensor_data(t.float().numpy() if kind == Q.F32 else quantize_rows(t, kind))
        if i % 50 == 0:
            print(f"# {name}: {i + 1}/{len(plan)} tensors, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)
    writer.close()
    part.rename(part.with_suffix(""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model", type=Path, help="checkpoint folder in the published layout (safetensors)")
    ap.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    ap.add_argument("--transformer", choices=WRITABLE + RANDOM, help="ggml type of the transformer's matrices")
    ap.add_argument("--text-encoder", choices=WRITABLE + RANDOM, help="ggml type of the text encoder's matrices")
    ap.add_argument("--others", type=Path,
                    help="link the components not converted from this folder (default MODEL): e.g. another "
                         "variant's GGUF text encoder, so that variants share it on disk")
    a = ap.parse_args()
    if a.out.exists():
        print(f"error: {a.out} exists", file=sys.stderr)
        return 2
    types = {"transformer": a.transformer, "text_encoder": a.text_encoder}
    tmp = a.out.with_name(a.out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in sorted((a.others or a.model).resolve().iterdir()):
        if types.get(item.name) is None:
            (tmp / item.name).symlink_to(item)
    for name, qtype in types.items():
        if qtype is not None:
            t0 = time.perf_counter()
            write_component(a.model, tmp, name, Q[qtype])
            print(f"# {name} written as {qtype} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    tmp.rename(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
