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


@pytest.mark.parametrize("qtype", sorted(SCALE_FIELDS, key=int), ids=lambda q: q.name)
def test_chunked_dequantization_bit_exact(qtype, monkeypatch):
    """On the CPU a large tensor is dequantized a chunk of blocks at a time (zimage.gguf.CHUNK_VALUES): the same
    values, in float32 and rounded to bfloat16, as gguf-py's whole-tensor result, a short last chunk included."""
    import zimage.gguf

    monkeypatch.setattr(zimage.gguf, "CHUNK_VALUES", 512)
    raw = random_blocks(qtype, rows=7, blocks_per_row=3, seed=int(qtype) + 100)
    expected = torch.from_numpy(quants.dequantize(raw, qtype).copy())
    got = dequantize(torch.from_numpy(raw), qtype, tuple(expected.shape))
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(dequantize(torch.from_numpy(raw), qtype, tuple(expected.shape), torch.bfloat16),
                       expected.bfloat16())


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


# ------------------------------------------------------------------------------------ GGUF transformer files

import itertools  # noqa: E402
import shutil  # noqa: E402

from gguf import GGUFWriter  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from zimage.cli import app  # noqa: E402
from zimage.gguf import original_transformer_keys, transformer_keys  # noqa: E402
from zimage.tiny import TinySpec, make_tiny  # noqa: E402
from zimage.weights import WEIGHT_STEMS, save_weights  # noqa: E402

# dims that are multiples of 32 (legacy blocks) and FFN/timestep inputs of 256 and 1024 (K-quant blocks)
SPEC96 = TinySpec(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, axes_dims=(8, 8, 16), te_hidden=64,
                  te_layers=2, te_heads=4, te_kv_heads=1, te_intermediate=256, seed=3)
TRANSFORMER_FILE = f"transformer/{WEIGHT_STEMS['transformer']}.safetensors"
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
LEGACY = (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1)
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "5", "-q", "-p", "a cat"]


def k_blocks(weights: np.ndarray, qtype: Q, seed: int) -> np.ndarray:
    """Random `qtype` blocks (gguf-py cannot quantize K types) scaled to the RMS of `weights`: dequantization is
    linear in the block scales, so scaling them scales the values."""
    raw = random_blocks(qtype, weights.shape[0], weights.shape[1] // GGML_QUANT_SIZES[qtype][0], seed)
    rows = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    factor = np.sqrt((weights**2).mean() / (quants.dequantize(raw, qtype) ** 2).mean())
    for off in SCALE_FIELDS[qtype]:
        scale = rows[:, off : off + 2].copy().view(np.float16).astype(np.float32) * factor
        rows[:, off : off + 2] = scale.astype(np.float16).view(np.uint8)
    return rows.reshape(raw.shape)


def mixed_types():
    """A type picker: K types in turn where the input width allows, legacy types elsewhere, float types for the
    rest, as published files mix them."""
    turns = {K_TYPES: itertools.count(), LEGACY: itertools.count(), (Q.F32, Q.F16, Q.BF16): itertools.count()}

    def pick(name: str, t: torch.Tensor, i: int) -> Q:
        if t.ndim == 2 and t.shape[1] % 256 == 0 and name.endswith("weight"):
            kinds = K_TYPES
        elif t.ndim == 2 and t.shape[1] % 32 == 0 and t.shape[0] > 1 and name.endswith("weight"):
            kinds = LEGACY
        else:
            kinds = (Q.F32, Q.F16, Q.BF16)
        return kinds[next(turns[kinds]) % len(kinds)]

    return pick


def diffusers_types(name: str, t: torch.Tensor, i: int) -> Q:
    """The types the reference test uses: Q8_0, Q4_0, Q5_0 and F16 (F32 for vectors)."""
    if t.ndim == 2 and t.shape[1] % 32 == 0 and t.shape[0] > 1:
        return (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.F16)[i % 4]
    return Q.F32


def write_gguf(state: dict[str, torch.Tensor], path: Path, pick, arch: str = "lumina2") -> dict[str, torch.Tensor]:
    """Write our-keyed float tensors as an original-keyed GGUF with the types `pick` chooses; returns the
    dequantized values (gguf-py's numpy dequantization) under our keys."""
    writer = GGUFWriter(str(path), arch)
    ref = {}
    for i, (name, t) in enumerate(original_transformer_keys(state).items()):
        qtype = pick(name, t, i)
        arr = t.float().numpy()
        if qtype == Q.F32:
            raw = arr
            writer.add_tensor(name, raw)
        elif qtype == Q.F16:
            raw = arr.astype(np.float16)
            writer.add_tensor(name, raw)
        else:
            raw = k_blocks(arr, qtype, i) if qtype in K_TYPES else quants.quantize(arr, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        ref[name] = torch.from_numpy(quants.dequantize(raw, qtype).copy()).reshape(t.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(transformer_keys(ref))


@pytest.fixture(scope="module")
def base96(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("gguf") / "base", SPEC96)


def gguf_model(base: Path, root: Path, pick, name: str = "model.gguf") -> tuple[Path, Path]:
    """A copy of `base` with a GGUF transformer, and one with the same weights dequantized to float32."""
    quantized, dequantized = root / "quantized", root / "dequantized"
    shutil.copytree(base, quantized)
    shutil.copytree(base, dequantized)
    (quantized / TRANSFORMER_FILE).unlink()
    ref = write_gguf(load_file(base / TRANSFORMER_FILE), quantized / "transformer" / name, pick)
    save_weights(ref, dequantized / "transformer", WEIGHT_STEMS["transformer"])
    return quantized, dequantized


def image(model: Path, out: Path, *args: str) -> np.ndarray:
    result = CliRunner().invoke(app, ["generate", "--model-path", str(model), "-o", str(out), *SMALL, *args])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out), dtype=np.int16)


def test_mixed_type_gguf_image_matches_dequantized_weights(base96, tmp_path):
    quantized, dequantized = gguf_model(base96, tmp_path, mixed_types())
    ours = image(quantized, tmp_path / "q.png")
    ref = image(dequantized, tmp_path / "d.png")
    assert np.abs(ours - ref).max() <= 1
    assert np.abs(ours - image(base96, tmp_path / "b.png")).max() > 0  # the quantization reached the image


def test_gguf_linears_stay_quantized(base96, tmp_path):
    from zimage.pipeline import load_transformer
    from zimage.quant import QuantLinear

    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    model = load_transformer(quantized, torch.device("cpu"), torch.float32)
    fmts = {m.fmt for m in model.modules() if isinstance(m, QuantLinear)}
    assert set(K_TYPES) | set(LEGACY) <= {Q[f] for f in fmts}
    assert model.layers[0].attention.to_q.weight.dtype == torch.uint8
    assert "layers.0.attention.to_q.weight" in model.state_dict()  # names stay the checkpoint's keys


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.inference_mode()
def test_gguf_transformer_matches_diffusers_gguf(base96, tmp_path):
    """The same GGUF file (Q8_0, Q4_0, Q5_0, F16) through diffusers' GGUFQuantizationConfig + from_single_file."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from zimage.pipeline import load_transformer

    quantized, _ = gguf_model(base96, tmp_path, diffusers_types)
    gguf_path = quantized / "transformer" / "model.gguf"
    ref = ZImageTransformer2DModel.from_single_file(
        str(gguf_path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(quantized), subfolder="transformer", torch_dtype=torch.float32)
    assert type(ref.layers[0].attention.to_q.weight).__name__ == "GGUFParameter"  # diffusers kept it quantized
    ours = load_transformer(quantized, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 10, generator=gen)
    t = torch.rand(2, generator=gen)
    caps = [torch.randn(n, ours.cfg.cap_feat_dim, generator=gen) for n in (5, 40)]
    expected = torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]).squeeze(2)
    assert rel_err(ours(x, t, caps), expected) <= 1e-3


# ------------------------------------------------------------------------------------------------ bad input

def failing(model: Path, out: Path) -> str:
    """Run generate expecting the one-line failure of a broken weight file (exit 1, as for safetensors)."""
    result = CliRunner().invoke(app, ["generate", "--model-path", str(model), "-o", str(out), *SMALL])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()
    return lines[0]


def broken_gguf(base: Path, root: Path, edit) -> Path:
    """A copy of `base` whose transformer is a GGUF (Q8_0 where it can be) edited by `edit(state, path)`."""
    model = root / "model"
    shutil.copytree(base, model)
    (model / TRANSFORMER_FILE).unlink()
    edit(load_file(base / TRANSFORMER_FILE), model / "transformer" / "model.gguf")
    return model


def test_gguf_of_another_architecture(base96, tmp_path):
    model = broken_gguf(base96, tmp_path, lambda s, p: write_gguf(s, p, diffusers_types, arch="flux"))
    assert "architecture 'flux', not 'lumina2'" in failing(model, tmp_path / "x.png")


def test_gguf_with_an_unsupported_tensor_type(base96, tmp_path):
    def edit(state, path):
        writer = GGUFWriter(str(path), "lumina2")
        for name, t in original_transformer_keys(state).items():
            if name == "layers.0.feed_forward.w2.weight":  # IQ4_NL: 32 values in 18 bytes, a type zimage lacks
                writer.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
            else:
                writer.add_tensor(name, t.float().numpy())
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()

    message = failing(broken_gguf(base96, tmp_path, edit), tmp_path / "x.png")
    assert "'layers.0.feed_forward.w2.weight' has type IQ4_NL, which zimage cannot read" in message


def test_truncated_gguf(base96, tmp_path):
    def edit(state, path):
        write_gguf(state, path, diffusers_types)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert "is not a readable GGUF file" in failing(broken_gguf(base96, tmp_path, edit), tmp_path / "x.png")


def test_gguf_with_mismatched_shapes(base96, tmp_path):
    def edit(state, path):
        state["layers.1.feed_forward.w1.weight"] = state["layers.1.feed_forward.w1.weight"][:128]
        write_gguf(state, path, diffusers_types)

    message = failing(broken_gguf(base96, tmp_path, edit), tmp_path / "x.png")
    assert "'layers.1.feed_forward.w1.weight' has shape [128, 96], expected [256, 96]" in message


def test_two_gguf_files_are_ambiguous(base96, tmp_path):
    def edit(state, path):
        write_gguf(state, path, diffusers_types)
        shutil.copy(path, path.with_name("other.gguf"))

    assert "holds 2 GGUF files" in failing(broken_gguf(base96, tmp_path, edit), tmp_path / "x.png")


def test_check_reports_a_gguf_transformer(base96, tmp_path):
    quantized, _ = gguf_model(base96, tmp_path, diffusers_types)
    result = CliRunner().invoke(app, ["check", "--model-path", str(quantized)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("transformer"))
    assert "1 file(s)" in line and "F16/F32/Q4_0/Q5_0/Q8_0" in line


def test_check_finds_a_misshapen_gguf_transformer(base96, tmp_path):
    def edit(state, path):
        state["layers.1.feed_forward.w1.weight"] = state["layers.1.feed_forward.w1.weight"][:128]
        write_gguf(state, path, diffusers_types)

    result = CliRunner().invoke(app, ["check", "--model-path", str(broken_gguf(base96, tmp_path, edit))])
    assert result.exit_code == 1
    assert "transformer   FAIL  model.gguf: tensor 'layers.1.feed_forward.w1.weight' has shape" in result.output


# ------------------------------------------------------------------------------------ GGUF text encoder files

LLAMA_CPP_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_name(key: str) -> str:
    key = key.removeprefix("model.")
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    _, n, rest = key.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"blk.{n}.{LLAMA_CPP_NAMES[module]}.{param}"


def write_text_encoder_gguf(folder: Path, path: Path, pick) -> None:
    """The text encoder of a tiny checkpoint as llama.cpp publishes Qwen3: its names, its metadata."""
    import json

    from safetensors.torch import load_file as load

    cfg = json.loads((folder / "config.json").read_text())
    writer = GGUFWriter(str(path), "qwen3")
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
    for i, (key, t) in enumerate(load(folder / "model.safetensors").items()):
        qtype, arr = pick(key, t, i), t.float().numpy()
        if qtype == Q.F32:
            writer.add_tensor(llama_cpp_name(key), arr)
        else:
            raw = k_blocks(arr, qtype, i) if qtype in K_TYPES else quants.quantize(arr, qtype)
            writer.add_tensor(llama_cpp_name(key), raw, raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()


@torch.inference_mode()
def test_gguf_text_encoder_matches_transformers_gguf_loading(base96, tmp_path):
    """zimage's features from a llama.cpp-style Qwen3 GGUF vs transformers' own GGUF loader on the same file."""
    from transformers import AutoConfig, Qwen3Model

    from zimage.quant import QuantLinear
    from zimage.text_encoder import TextEncoder

    model = tmp_path / "model"
    shutil.copytree(base96, model)
    (model / "text_encoder" / "model.safetensors").unlink()
    write_text_encoder_gguf(base96 / "text_encoder", model / "text_encoder" / "model.gguf", mixed_types())
    ours = TextEncoder.load(model, torch.device("cpu"), torch.float32)
    assert isinstance(ours.model.layers[0].mlp.down_proj, QuantLinear)
    ids = ours.tokenize("a red fox in the snow")
    # the config given: transformers reads no head_dim from qwen3 GGUF metadata (it assumes Qwen3's 128)
    folder = model / "text_encoder"
    ref = Qwen3Model.from_pretrained(str(folder), gguf_file="model.gguf", config=AutoConfig.from_pretrained(folder),
                                     dtype=torch.float32)
    expected = ref(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]
    got = ours.encode(["a red fox in the snow"])[0]
    assert rel_err(got, expected) <= 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_token_embedding_is_looked_up_from_its_blocks(base96, tmp_path, dtype):
    """A quantized token_embd stays quantized (only the rows of a prompt's tokens are dequantized) and gives the
    same features as a file holding that table's dequantized values as F32, which loads as a plain Embedding."""
    from safetensors.torch import save_file

    from zimage.gguf import GGUFEmbedding
    from zimage.text_encoder import TextEncoder

    def pick(key: str, t: torch.Tensor, i: int) -> Q:
        return Q.Q4_0 if "embed_tokens" in key else Q.F32

    quantized, floats = tmp_path / "quantized", tmp_path / "floats"
    for model in (quantized, floats):
        shutil.copytree(base96, model)
        (model / "text_encoder" / "model.safetensors").unlink()
    write_text_encoder_gguf(base96 / "text_encoder", quantized / "text_encoder" / "model.gguf", pick)
    state = load_file(base96 / "text_encoder" / "model.safetensors")
    key = next(k for k in state if "embed_tokens" in k)
    table = state[key].float().numpy()
    state[key] = torch.from_numpy(quants.dequantize(quants.quantize(table, Q.Q4_0), Q.Q4_0).copy())
    source = tmp_path / "dequantized"
    source.mkdir()
    shutil.copy(base96 / "text_encoder" / "config.json", source / "config.json")
    save_file(state, source / "model.safetensors")
    write_text_encoder_gguf(source, floats / "text_encoder" / "model.gguf", pick=lambda *_: Q.F32)

    ours = TextEncoder.load(quantized, torch.device("cpu"), dtype)
    embed = ours.model.embed_tokens
    assert isinstance(embed, GGUFEmbedding) and embed.weight.dtype == torch.uint8
    assert embed.weight.numel() == table.size // 32 * 18  # Q4_0: 18 bytes per 32 values
    ref = TextEncoder.load(floats, torch.device("cpu"), dtype)
    assert isinstance(ref.model.embed_tokens, torch.nn.Embedding)
    prompts = ["a red fox in the snow", "a cat"]
    for got, expected in zip(ours.encode(prompts), ref.encode(prompts)):
        assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.cuda
@torch.inference_mode()
def test_gpu_quantized_token_embedding(base96, tmp_path, accelerator):
    """A GGUF text encoder whose embedding stays quantized gives on the GPU the features it gives on the CPU."""
    from zimage.gguf import GGUFEmbedding
    from zimage.text_encoder import TextEncoder

    model = tmp_path / "model"
    shutil.copytree(base96, model)
    (model / "text_encoder" / "model.safetensors").unlink()
    write_text_encoder_gguf(base96 / "text_encoder", model / "text_encoder" / "model.gguf", mixed_types())
    gpu = TextEncoder.load(model, accelerator, torch.float32)
    assert isinstance(gpu.model.embed_tokens, GGUFEmbedding) and gpu.model.embed_tokens.weight.device.type == accelerator.type
    cpu = TextEncoder.load(model, torch.device("cpu"), torch.float32)
    assert rel_err(gpu.encode(["a red fox"])[0].cpu(), cpu.encode(["a red fox"])[0]) <= 1e-4


def test_generate_and_check_with_gguf_text_encoder_and_transformer(base96, tmp_path):
    model, _ = gguf_model(base96, tmp_path, mixed_types())
    (model / "text_encoder" / "model.safetensors").unlink()
    write_text_encoder_gguf(base96 / "text_encoder", model / "text_encoder" / "model.gguf", mixed_types())
    assert image(model, tmp_path / "x.png").std() > 0
    result = CliRunner().invoke(app, ["check", "--model-path", str(model)])
    assert result.exit_code == 0, result.output
    assert "text_encoder  ok    1 file(s)" in result.output


# ------------------------------------------------------------------------ on a GPU: scripts/gpu_check.sh


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", sorted(SCALE_FIELDS, key=int), ids=lambda q: q.name)
def test_gpu_dequantization_is_bit_exact(qtype, accelerator):
    device = accelerator
    raw = random_blocks(qtype, rows=64, blocks_per_row=4, seed=int(qtype))
    expected = torch.from_numpy(quants.dequantize(raw, qtype).copy())
    got = dequantize(torch.from_numpy(raw).to(device), qtype, tuple(expected.shape)).cpu()
    assert torch.equal(got, expected)


@pytest.mark.cuda
def test_gpu_gguf_image_matches_cpu(base96, tmp_path, accelerator):
    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    cpu = image(quantized, tmp_path / "cpu.png", "--cpu", "--dtype", "float32")
    gpu = image(quantized, tmp_path / "gpu.png", "--dtype", "float32", "--offload", "sequential")
    assert np.abs(cpu - gpu).max() <= 2


@torch.inference_mode()
def test_tensor_regrouped_with_orig_shape_is_read_in_its_shape(base96, tmp_path):
    """ComfyUI-GGUF's converter may regroup a matrix into rows of 256 (for K types) and record
    comfy.gguf.orig_shape.NAME; such a tensor is dequantized into its recorded shape."""
    from zimage.pipeline import load_transformer

    model = tmp_path / "model"
    shutil.copytree(base96, model)
    (model / TRANSFORMER_FILE).unlink()
    state = original_transformer_keys(load_file(base96 / TRANSFORMER_FILE))
    writer = GGUFWriter(str(model / "transformer" / "model.gguf"), "lumina2")
    ref = {}
    for name, t in state.items():
        arr = t.float().numpy()
        if name == "layers.0.feed_forward.w1.weight":  # (256, 96): regrouped as (96, 256) to take Q4_K blocks
            raw = k_blocks(arr.reshape(-1, 256), Q.Q4_K, 0)
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(arr.shape))
            writer.add_tensor(name, raw, raw_dtype=Q.Q4_K)
            ref[name] = torch.from_numpy(quants.dequantize(raw, Q.Q4_K).copy()).reshape(t.shape)
        else:
            writer.add_tensor(name, arr)
            ref[name] = t.float()
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    dequantized = tmp_path / "dequantized"
    shutil.copytree(base96, dequantized)
    save_weights(transformer_keys(ref), dequantized / "transformer", WEIGHT_STEMS["transformer"])
    ours, expected = (load_transformer(m, torch.device("cpu"), torch.float32) for m in (model, dequantized))
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.rand(1, generator=gen)
    caps = [torch.randn(7, ours.cfg.cap_feat_dim, generator=gen)]
    assert torch.equal(ours(x, t, caps), expected(x, t, caps))


def test_transformer_flag_takes_a_gguf_file(base96, tmp_path):
    """`--transformer FILE.gguf` beside a folder in the published layout: the same image as the GGUF in the folder."""
    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    gguf_file = tmp_path / "zit-mixed.gguf"
    shutil.copy(quantized / "transformer" / "model.gguf", gguf_file)
    in_folder = image(quantized, tmp_path / "a.png")
    given = image(base96, tmp_path / "b.png", "--transformer", str(gguf_file))
    assert np.array_equal(in_folder, given)
    result = CliRunner().invoke(app, ["check", str(base96), "--transformer", str(gguf_file)])
    assert result.exit_code == 0, result.output
    assert "Q4_K" in next(ln for ln in result.output.splitlines() if ln.startswith("transformer"))
