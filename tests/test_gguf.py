"""GGUF: ggml dequantization in torch against gguf-py's numpy reference, and reading GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants

from zimage.gguf import BLOCK_DEQUANT, dequantize

# byte offsets of the float16 scale fields (d, dmin) inside one block of each type
SCALE_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
                Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16)  # the types gguf-py can quantize


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes in the layout of `qtype`, with finite float16 scales: every bit pattern of the packed
    quants, scales and mins gets exercised, which quantizing smooth data would not do."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = (rng.standard_normal(len(raw)) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", sorted(SCALE_FIELDS, key=int), ids=lambda q: q.name)
def test_random_blocks_bit_exact(qtype):
    raw = random_blocks(qtype, rows=7, blocks_per_row=3, seed=int(qtype))
    expected = quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype, expected.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    assert torch.equal(got.view(torch.int32), torch.from_numpy(expected.copy()).view(torch.int32))  # bit-exact


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_quantized_weights_bit_exact(qtype):
    weights = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    raw = quants.quantize(weights, qtype)
    expected = quants.dequantize(raw, qtype)
    data = torch.from_numpy(raw) if qtype != Q.BF16 else torch.from_numpy(raw).view(torch.bfloat16)
    got = dequantize(data, qtype, expected.shape)
    assert torch.equal(got, torch.from_numpy(expected.copy()))
    assert np.abs(expected - weights).max() < 0.5  # a sanity check that the round trip means something


def test_float_types_and_target_dtype():
    x = torch.randn(4, 64)
    assert torch.equal(dequantize(x.half(), Q.F16, (4, 64)), x.half().float())
    assert torch.equal(dequantize(x, Q.F32, (4, 64), torch.bfloat16), x.bfloat16())
    raw = random_blocks(Q.Q4_K, 2, 1)
    ref = dequantize(torch.from_numpy(raw), Q.Q4_K, (2, 256))
    assert torch.equal(dequantize(torch.from_numpy(raw), Q.Q4_K, (2, 256), torch.bfloat16), ref.bfloat16())


def test_every_advertised_type_is_covered():
    assert set(BLOCK_DEQUANT) == set(SCALE_FIELDS)
