"""LoRAs on weights stored quantized (GGUF, ComfyUI scaled fp8): computed beside the quantized weights (lowrank.py),
they give what merging the same LoRAs into the dequantized weights gives; and --quantize on such files.

Every comparison runs in float32 against a folder holding the file's weights dequantized (gguf-py's numpy
dequantization, or fp8 times its scale) with the LoRAs merged by the ordinary path: both compute W x + U (D x)
with the same W, U, D, so they differ only by float32 summation order (relative ~1e-6 on the transformer output),
which moves an 8-bit pixel by at most 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from typer.testing import CliRunner

from zimage.cli import app
from zimage.lora import LoraSet, model_shapes, module_delta, module_factors, read_lora
from zimage.lowrank import LowRank
from zimage.modelfiles import ModelFiles
from zimage.pipeline import load_transformer
from zimage.quant import QuantLinear
from zimage.text_encoder import TextEncoder

from test_errors import assert_one_line_error, snapshot
from test_gguf import base96, gguf_model, image, mixed_types, write_text_encoder_gguf  # noqa: F401 (a fixture)
from test_lora import BLOCKS, dialect, fused_qkv, lokr_state, peft_lora, shared_down, write
from test_quant import comfy_fp8_file

CPU = torch.device("cpu")
F32 = ["--dtype", "float32"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def transformer_output(source, loras: list[tuple[Path, float]]) -> torch.Tensor:
    """The transformer of `source` with `loras` (as a run loads them) on one fixed input, in float32."""
    files = ModelFiles.of(source)
    patch = LoraSet([(read_lora(p, model_shapes(files)), s) for p, s in loras]).patch("transformer") if loras else None
    model = load_transformer(files, CPU, torch.float32, patch=patch)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.rand(1, generator=gen)
    caps = [torch.randn(7, model.cfg.cap_feat_dim, generator=gen)]
    with torch.inference_mode():
        return model(x, t, caps)


@pytest.fixture(scope="module")
def loras96(base96, tmp_path_factory) -> dict[str, Path]:
    """LoRA files for the 96-wide checkpoint: two peft LoRAs (kohya and diffusers-style names), a fused-qkv one,
    a LoHa and a LoKr."""
    root = tmp_path_factory.mktemp("loras96")
    shapes = model_shapes(base96)["transformer"]
    sd, cfg = peft_lora(base96, BLOCKS + ["layers.0.adaLN_modulation.0", "all_final_layer.2-1.linear"], seed=21)
    sd2, cfg2 = peft_lora(base96, ["to_k", "w2", "t_embedder.mlp.0"], r=8, alpha=4, seed=22)
    qkv, qcfg = peft_lora(base96, ["to_q", "to_k", "to_v"], seed=23)
    gen, loha = torch.Generator().manual_seed(24), {}
    for m in ["layers.0.attention.to_v", "layers.1.feed_forward.w1", "noise_refiner.0.feed_forward.w2"]:
        out, inp = shapes[m + ".weight"]
        k = "lycoris_" + m.replace(".", "_")
        loha |= {f"{k}.hada_w1_a": torch.randn(out, 2, generator=gen), f"{k}.hada_w2_a": torch.randn(out, 2, generator=gen),
                 f"{k}.hada_w1_b": torch.randn(2, inp, generator=gen) / inp**0.5,
                 f"{k}.hada_w2_b": torch.randn(2, inp, generator=gen) / inp**0.5, f"{k}.alpha": torch.tensor(3.0)}
    lokr = lokr_state(base96, [f"layers.{i}.attention.to_{p}" for i in range(2) for p in ("q", "out.0")]
                      + ["layers.0.feed_forward.w2"], "diffusion_model.", 25)
    return {"kohya": write(dialect(sd, cfg, "kohya"), root / "kohya.safetensors"),
            "ai-toolkit": write(dialect(sd2, cfg2, "ai-toolkit"), root / "ait.safetensors"),
            "qkv": write(fused_qkv(shared_down(qkv), qcfg, dotted=False), root / "qkv.safetensors"),
            "loha": write(loha, root / "loha.safetensors"), "lokr": write(lokr, root / "lokr.safetensors")}


# ------------------------------------------------------------------------------------------------- GGUF


def test_loras_on_a_gguf_transformer_give_the_merged_output(base96, tmp_path, loras96):
    """Every kind of LoRA, several at once with their scales, on a GGUF file mixing K, legacy and float types:
    the output is the one of the LoRAs merged into the dequantized weights."""
    quantized, dequantized = gguf_model(base96, tmp_path, mixed_types())
    loras = [(loras96["kohya"], 0.8), (loras96["ai-toolkit"], -0.5), (loras96["qkv"], 0.7), (loras96["loha"], 0.5),
             (loras96["lokr"], 0.6)]
    got, expected = transformer_output(quantized, loras), transformer_output(dequantized, loras)
    assert rel_err(got, expected) < 1e-5  # float32 summation order only
    assert rel_err(transformer_output(quantized, []), expected) > 1e-2  # the LoRAs changed the output


def test_lora_on_a_gguf_transformer_keeps_its_weights_quantized_and_their_names(base96, tmp_path, loras96):
    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    files = ModelFiles.of(quantized)
    patch = LoraSet([(read_lora(loras96["kohya"], model_shapes(files)), 1.0)]).patch("transformer")
    model = load_transformer(files, CPU, torch.float32, patch=patch)
    plain = load_transformer(files, CPU, torch.float32)
    layer = model.layers[0].attention.to_q
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.uint8
    assert isinstance(layer.lora, LowRank) and layer.lora.down.shape == (4, 96)  # rank 4: the update is never made
    assert torch.equal(layer.weight, plain.layers[0].attention.to_q.weight)  # the quantized bytes are untouched
    assert model.state_dict().keys() == plain.state_dict().keys()  # parameter names stay the checkpoint's keys


def test_generate_with_loras_on_a_gguf_transformer_makes_the_merged_image(base96, tmp_path, loras96):
    """Through `zimage generate`: the same picture as the dequantized folder with the same LoRAs merged."""
    quantized, dequantized = gguf_model(base96, tmp_path, mixed_types())
    args = ["--lora", f"{loras96['kohya']}:0.8", "--lora", f"{loras96['loha']}:0.5", *F32]
    ours = image(quantized, tmp_path / "q.png", *args)
    assert np.abs(ours - image(dequantized, tmp_path / "d.png", *args)).max() <= 1
    assert np.abs(ours - image(quantized, tmp_path / "plain.png", *F32)).max() > 10  # not vacuous


def text_encoder_lora(folder: Path, path: Path) -> Path:
    """A peft LoRA on the Qwen3 text encoder of `folder`, in kohya's `lora_te_` names."""
    from transformers import Qwen3Model

    model = Qwen3Model.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                       init_lora_weights=False), model)
    gen = torch.Generator().manual_seed(26)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / p.shape[1] ** 0.5)
    return write({f"lora_te_{k.removesuffix('.lora_A.weight').removesuffix('.lora_B.weight').replace('.', '_')}"
                  f".lora_{'down' if '.lora_A.' in k else 'up'}.weight": v.contiguous()
                  for k, v in get_peft_model_state_dict(model).items()}, path)


def test_text_encoder_lora_on_a_gguf_text_encoder(base96, tmp_path):
    """A text-encoder LoRA on a llama.cpp GGUF text encoder: the features and the image of the same LoRA merged into
    the dequantized text encoder."""
    from safetensors.torch import save_file

    from zimage.gguf import read_gguf

    lora = text_encoder_lora(base96, tmp_path / "te.safetensors")
    quantized, dequantized = tmp_path / "q", tmp_path / "d"
    shutil.copytree(base96, quantized)
    shutil.copytree(base96, dequantized)
    (quantized / "text_encoder" / "model.safetensors").unlink()
    write_text_encoder_gguf(base96 / "text_encoder", quantized / "text_encoder" / "model.gguf", mixed_types())
    _, tensors = read_gguf(quantized / "text_encoder" / "model.gguf")
    from zimage.gguf import llama_cpp_pieces_of

    save_file({"model." + k: t.dequantize().contiguous() for name, t in tensors.items()
               for k in llama_cpp_pieces_of(name)}, str(dequantized / "text_encoder" / "model.safetensors"))
    feats = []
    for folder in (quantized, dequantized):
        patch = LoraSet([(read_lora(lora, model_shapes(folder)), 0.9)]).patch("text_encoder")
        te = TextEncoder.load(folder, CPU, torch.float32, patch=patch)
        feats.append(te.encode(["a red fox in the snow"])[0])
    assert isinstance(te.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # the reference really is unquantized
    assert rel_err(feats[0], feats[1]) < 1e-5
    ours = image(quantized, tmp_path / "q.png", "--lora", f"{lora}:0.9", *F32)
    assert np.abs(ours - image(dequantized, tmp_path / "d.png", "--lora", f"{lora}:0.9", *F32)).max() <= 1
    assert np.abs(ours - image(quantized, tmp_path / "plain.png", *F32)).max() > 10


# ------------------------------------------------------------------------------------------ scaled fp8


def test_lora_on_a_comfyui_scaled_fp8_transformer_makes_the_merged_image(tiny, tmp_path):
    from zimage.weights import save_weights

    fp8_file = tmp_path / "zit_fp8_scaled.safetensors"
    dequantized = tmp_path / "dequantized"
    shutil.copytree(tiny, dequantized)
    save_weights(comfy_fp8_file(tiny, fp8_file, per_row=True), dequantized / "transformer", "diffusion_pytorch_model")
    sd, cfg = peft_lora(tiny, BLOCKS, seed=27)
    a = write(dialect(sd, cfg, "kohya"), tmp_path / "a.safetensors")
    b = write(fused_qkv(shared_down(sd), cfg, dotted=True), tmp_path / "b.safetensors")
    loras = [(a, 0.9), (b, -0.4)]
    files = ModelFiles(folder=tiny, transformer=fp8_file)
    assert rel_err(transformer_output(files, loras), transformer_output(dequantized, loras)) < 1e-5
    args = [arg for p, s in loras for arg in ("--lora", f"{p}:{s}")] + F32
    ours = image(tiny, tmp_path / "q.png", "--transformer", str(fp8_file), *args)
    assert np.abs(ours - image(dequantized, tmp_path / "d.png", *args)).max() <= 1
    assert np.abs(ours - image(tiny, tmp_path / "plain.png", "--transformer", str(fp8_file), *F32)).max() > 10


# --------------------------------------------------------------------------------------- the factors


def test_factors_of_every_kind_multiply_to_its_update(base96, loras96):
    """module_factors is exact: up @ down equals module_delta for LoRA, fused-qkv rows, LoHa and LoKr."""
    from safetensors.torch import load_file

    shapes = model_shapes(base96)
    for name in ("kohya", "qkv", "loha", "lokr"):
        lora, tensors = read_lora(loras96[name], shapes), load_file(loras96[name])
        for m in lora.modules:
            for target in m.targets:
                down, up = module_factors(m, tensors.__getitem__, target)
                assert torch.allclose(up @ down, module_delta(m, tensors.__getitem__, target), atol=1e-5), m.name


def test_a_lokr_with_a_whole_w2_is_held_whole(tiny, tmp_path):
    """No thin form: the update is kept whole beside the weight (and still equals the merge)."""
    gen = torch.Generator().manual_seed(28)
    key = "layers.0.feed_forward.w1"
    out, inp = model_shapes(tiny)["transformer"][key + ".weight"]
    path = write({f"diffusion_model.{key}.lokr_w1": torch.randn(2, 2, generator=gen),
                  f"diffusion_model.{key}.lokr_w2": torch.randn(out // 2, inp // 2, generator=gen) * 0.1},
                 tmp_path / "lokr.safetensors")
    loras = LoraSet([(read_lora(path, model_shapes(tiny)), 0.5)])
    down, up = loras.factors("transformer", key + ".weight")
    assert down is None and torch.equal(up, loras.delta("transformer", key + ".weight"))


# ------------------------------------------------------------------------- --quantize on quantized files


def generate(model: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), "-p", "a cat", "--width", "64",
                                    "--height", "64", "--num-steps", "1", "-o", str(out), *args])


@pytest.mark.parametrize("flag", ["--quantize", "--quantize-text-encoder"])
def test_quantize_with_a_gguf_file_is_a_usage_error(base96, tmp_path, loads, flag):
    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    if flag == "--quantize-text-encoder":
        (quantized / "text_encoder" / "model.safetensors").unlink()
        write_text_encoder_gguf(base96 / "text_encoder", quantized / "text_encoder" / "model.gguf", mixed_types())
    before = snapshot(tmp_path)
    result = generate(quantized, tmp_path / "out" / "o.png", flag, "int8")
    assert_one_line_error(result, 2, f"{flag} int8", "model.gguf", "already quantized (GGUF)")
    assert snapshot(tmp_path) == before and not loads


def test_quantize_with_a_scaled_fp8_file_is_a_usage_error(tiny, tmp_path, loads):
    fp8_file = tmp_path / "zit_fp8_scaled.safetensors"
    comfy_fp8_file(tiny, fp8_file)
    before = snapshot(tmp_path)
    result = generate(tiny, tmp_path / "out" / "o.png", "--transformer", str(fp8_file), "--quantize", "int8")
    assert_one_line_error(result, 2, "--quantize int8", "zit_fp8_scaled.safetensors", "already quantized (scaled fp8)")
    assert snapshot(tmp_path) == before and not loads


# ------------------------------------------------------------------------ on a GPU: scripts/gpu_check.sh


@pytest.mark.cuda
@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_gpu_loras_on_a_gguf_transformer_match_the_cpu(base96, tmp_path, loras96, accelerator, offload):
    """The factors beside the quantized weights follow the model onto the GPU, whole or streamed block by block."""
    if offload != "none" and accelerator.type != "cuda":
        pytest.skip("offload streams need CUDA")
    quantized, _ = gguf_model(base96, tmp_path, mixed_types())
    args = ["--lora", f"{loras96['kohya']}:0.8", "--lora", f"{loras96['loha']}:0.5", *F32]
    cpu = image(quantized, tmp_path / "cpu.png", "--cpu", *args)
    gpu = image(quantized, tmp_path / "gpu.png", "--offload", offload, *args)
    assert np.abs(cpu - gpu).max() <= 2
