"""--quantize int8|fp8: per-row weight quantization while loading, the quantized linear, and the flags."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import zimage.modelfiles
import zimage.pipeline
import zimage.quant
from zimage.cli import app
from zimage.pipeline import load_transformer
from zimage.quant import QuantLinear, quantize_fp8, quantize_int8
from zimage.text_encoder import TextEncoder

CPU = torch.device("cpu")
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "7", "-q", "-p", "a cat"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def test_int8_rounds_each_row_to_its_own_scale():
    w = torch.randn(8, 64) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different magnitude
    q = quantize_int8(w)
    assert q.data.dtype == torch.int8 and q.data.abs().max() == 127 and q.scale.shape == (8,)
    back = q.data.float() * q.scale[:, None]
    assert ((back - w).abs() <= q.scale[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest, per row


def test_fp8_stays_within_e4m3_precision():
    w = torch.randn(8, 64) * torch.logspace(-3, 1, 8)[:, None]
    q = quantize_fp8(w)
    assert q.data.dtype == torch.float8_e4m3fn
    back = q.data.float() * q.scale[:, None]
    assert (((back - w).abs() / w.abs().clamp(min=1e-3 * q.scale[:, None])) <= 2**-4).all()  # 3 mantissa bits


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_fp8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_linear_on_its_dequantized_weight(quantize, dtype):
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(3, 5, 64)
    q = quantize(w)
    layer = QuantLinear(q, b.to(dtype))
    ref = F.linear(x.double(), q.data.double() * q.scale.double()[:, None], b.to(dtype).double())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert rel_err(layer(x.to(dtype)), ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activations_are_rounded_per_row_and_multiplied_in_int8(dtype):
    w, b = torch.randn(48, 64), torch.randn(48)
    x = (torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5)[:, None]).to(dtype)  # rows of very different magnitude
    q = quantize_int8(w)
    layer = QuantLinear(q, b.to(dtype))
    layer.int8_activations = True
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 48)
    rows = x.double().reshape(-1, 64)
    step = rows.abs().amax(-1, keepdim=True) / 127
    weight = q.data.double() * q.scale.double()[:, None]
    ref = (torch.round(rows / step) * step) @ weight.T + b.to(dtype).double()
    assert rel_err(out.reshape(15, 48), ref) < (1e-4 if dtype == torch.float32 else 1e-2)
    assert rel_err(out.reshape(15, 48), rows @ weight.T + b.to(dtype).double()) > 1e-3  # activations were rounded


@pytest.mark.parametrize("activations, bound", [(False, 2e-2), (True, 4e-2)], ids=["weight-only", "int8-activations"])
def test_int8_transformer_output_is_close_and_weights_are_int8(tiny, monkeypatch, activations, bound):
    monkeypatch.setattr(zimage.quant, "INT8_ACTIVATIONS", "avx512_vnni" if activations else None)
    ref = load_transformer(tiny, CPU, torch.float32)
    ours = load_transformer(tiny, CPU, torch.float32, quantize="int8")
    assert ours.layers[0].feed_forward.w1.int8_activations == activations
    assert ours.layers[0].feed_forward.w1.weight.dtype == torch.int8
    assert "layers.0.feed_forward.w1.weight" in ours.state_dict()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.rand(1, generator=gen)
    caps = [torch.randn(7, ref.cfg.cap_feat_dim, generator=gen)]
    with torch.inference_mode():
        err = rel_err(ours(x, t, caps), ref(x, t, caps))
    assert 0 < err < bound


def test_quantizing_never_holds_two_unquantized_weights(tiny, monkeypatch):
    """Each float weight is quantized as it is read and dropped before the next one is read."""
    alive: list[weakref.ref] = []
    most = [0]
    real = zimage.quant.QUANTIZERS["int8"]

    def watching(w: torch.Tensor):
        alive.append(weakref.ref(w))
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return real(w)

    monkeypatch.setitem(zimage.quant.QUANTIZERS, "int8", watching)
    load_transformer(tiny, CPU, torch.float32, quantize="int8")
    assert len(alive) > 10 and most[0] == 1


@torch.inference_mode()
def test_int8_text_encoder_features_are_close(tiny):
    ref = TextEncoder.load(tiny, CPU, torch.float32)
    ours = TextEncoder.load(tiny, CPU, torch.float32, quantize="int8")
    assert isinstance(ours.model.layers[0].mlp.down_proj, QuantLinear)
    a, b = ref.encode(["a cat on a chair"])[0], ours.encode(["a cat on a chair"])[0]
    assert 0 < rel_err(b, a) < 2e-2


def test_generate_with_int8_transformer_and_text_encoder(tiny, tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-o", str(out), *SMALL,
                                      "--quantize", "int8", "--quantize-text-encoder", "int8"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.parametrize("args,message", [
    (["--quantize", "fp8"], "error: --quantize fp8: fp8 weights need a CUDA GPU with capability 8.9 or later, not cpu"),
    (["--quantize-text-encoder", "int4"], "error: --quantize-text-encoder int4: unknown quantization 'int4'"),
])
def test_bad_quantize_flags_are_usage_errors(tiny, tmp_path, args, message):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-o", str(out), *SMALL, "--cpu", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message), result.output
    assert not out.exists()


# ------------------------------------------------------------------------------------- --dtype auto on the CPU

def test_cpu_auto_dtype_follows_native_bf16_and_memory(monkeypatch):
    import zimage.devices as devices

    monkeypatch.setattr(devices, "native_bf16", lambda: "avx512_bf16")
    dtype, why = devices.cpu_dtype(10**15)
    assert dtype == torch.bfloat16 and "avx512_bf16" in why
    monkeypatch.setattr(devices, "native_bf16", lambda: None)
    assert devices.cpu_dtype(1)[0] == torch.float32
    dtype, why = devices.cpu_dtype(10**15)  # a petabyte of float32 never fits
    assert dtype == torch.bfloat16 and "float32 would need about" in why


def test_native_bf16_and_int8_read_the_cpu_flags(monkeypatch, tmp_path):
    import zimage.cpu as cpu

    real = cpu.Path
    for line, bf16, int8 in [("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16", "avx512_vnni"),
                             ("flags : fpu avx2 avx_vnni", None, "avx_vnni"),
                             ("Features\t: fp asimd bf16 i8mm", "bf16", None),
                             ("flags : amx_bf16 avx512_bf16 amx_int8 avx512_vnni", "amx_bf16", "amx_int8")]:
        (tmp_path / "cpuinfo").write_text(f"processor : 0\n{line}\n")
        monkeypatch.setattr(cpu, "Path", lambda p: real(tmp_path / "cpuinfo") if p == "/proc/cpuinfo" else real(p))
        monkeypatch.setattr(cpu.sys, "platform", "linux")
        monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64" if "Features" in line else "x86_64")
        cpu.cpu_flags.cache_clear()
        assert (cpu.native_bf16(), cpu.native_int8()) == (bf16, int8)
    cpu.cpu_flags.cache_clear()


@pytest.mark.parametrize("native, expected", [("avx512_bf16", "dtype bfloat16: the CPU computes bfloat16 natively"),
                                              (None, "dtype float32: this CPU has no native bfloat16")])
def test_generate_says_which_dtype_auto_picked(tiny, tmp_path, monkeypatch, native, expected):
    import zimage.devices as devices

    monkeypatch.setattr(devices, "native_bf16", lambda: native)
    seen = {}
    real = zimage.pipeline.Pipeline.__init__

    def spy(self, opts):
        seen["dtype"] = opts.dtype
        real(self, opts)

    monkeypatch.setattr(zimage.pipeline.Pipeline, "__init__", spy)
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-o", str(tmp_path / "x.png"),
                                      "--width", "64", "--height", "64", "--num-steps", "1", "--cpu", "-p", "a cat"])
    assert result.exit_code == 0, result.output
    assert expected in result.output
    assert seen["dtype"] == (torch.bfloat16 if native else torch.float32)


# --------------------------------------------------------------------------- ComfyUI fp8 single files

def comfy_fp8_file(tiny, path, per_row: bool = False) -> dict[str, torch.Tensor]:
    """The tiny transformer as ComfyUI writes scaled-fp8 files: original names under model.diffusion_model.,
    float8_e4m3fn matrices with a scale_weight each, the scaled_fp8 marker. Returns the dequantized weights."""
    from safetensors.torch import load_file, save_file

    from zimage.gguf import original_transformer_keys, transformer_keys

    state = original_transformer_keys(load_file(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    out, ref = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for name, t in state.items():
        key = f"model.diffusion_model.{name}"
        if t.ndim == 2 and t.shape[0] > 1:
            amax = t.abs().amax(dim=1) if per_row else t.abs().amax()
            scale = (amax / 448).float()
            q = (t / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
            out[key] = q
            out[key.replace(".weight", ".scale_weight")] = scale
            out[key.replace(".weight", ".scale_input")] = torch.ones(())  # activation scale, unused weight-only
            ref[name] = q.float() * (scale[:, None] if per_row else scale)
        else:
            out[key] = t.bfloat16()
            ref[name] = t.bfloat16().float()
    save_file(out, str(path))
    return transformer_keys(ref)


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_comfyui_scaled_fp8_file_loads_without_upcasting(tiny, tmp_path, per_row):
    """`--transformer` with a ComfyUI scaled-fp8 file: the weights stay float8 and the image is the one of the same
    weights dequantized into a float32 folder."""
    import shutil

    import numpy as np
    from PIL import Image

    from zimage.weights import save_weights

    fp8_file = tmp_path / "zit_fp8_scaled.safetensors"
    state = comfy_fp8_file(tiny, fp8_file, per_row)
    dequantized = tmp_path / "dequantized"
    shutil.copytree(tiny, dequantized)
    save_weights(state, dequantized / "transformer", "diffusion_pytorch_model")
    model = load_transformer(zimage.modelfiles.ModelFiles(folder=tiny, transformer=fp8_file), CPU, torch.float32)
    assert model.layers[0].attention.to_k.weight.dtype == torch.float8_e4m3fn
    images = []
    for name, args in (("a", ["--model-path", str(tiny), "--transformer", str(fp8_file)]),
                       ("b", ["--model-path", str(dequantized)])):
        result = CliRunner().invoke(app, ["generate", *args, "-o", str(tmp_path / f"{name}.png"), *SMALL,
                                          "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        images.append(np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_fp8_weight_without_a_scale_is_an_error(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from zimage.quant import read_scaled_fp8
    from zimage.weights import WeightsError

    comfy_fp8_file(tiny, tmp_path / "a.safetensors")
    state = load_file(tmp_path / "a.safetensors")
    del state["model.diffusion_model.layers.0.feed_forward.w1.scale_weight"]
    save_file(state, str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightsError, match="'model.diffusion_model.layers.0.feed_forward.w1.weight' has no scale"):
        read_scaled_fp8(tmp_path / "b.safetensors")


# ------------------------------------------------------------------------ on a GPU: scripts/gpu_check.sh

@pytest.mark.cuda
def test_gpu_fp8_and_int8_transformers_are_close_to_bfloat16(tiny):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = torch.device("cuda")
    ref = load_transformer(tiny, cuda, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=gen).to(cuda), torch.rand(1, generator=gen).to(cuda)
    caps = [torch.randn(7, ref.cfg.cap_feat_dim, generator=gen).to(cuda)]
    with torch.inference_mode():
        expected = ref(x, t, caps)
        formats = ["int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
        for fmt in formats:
            model = load_transformer(tiny, cuda, torch.bfloat16, quantize=fmt)
            # the CPU measured 2e-2 (int8) and 8e-2 (fp8) against float32
            assert rel_err(model(x, t, caps), expected) < (5e-2 if fmt == "int8" else 1.5e-1)


def test_patch_changes_weights_before_they_are_quantized(tiny):
    """Where a LoRA merge goes on --quantize: into the float weight, which is then quantized."""
    from zimage.modelfiles import ModelFiles, component
    from zimage.quant import load_quantized
    from zimage.transformer import ZImageTransformer

    key = "layers.0.feed_forward.w1.weight"
    comp = component(ModelFiles(folder=tiny), "transformer")
    with torch.device("meta"):
        model = ZImageTransformer(comp.config)
    load_quantized(model, comp.header, comp.pieces, torch.float32, CPU, "int8",
                   patch=lambda k, w: w * 0 + 0.5 if k == key else w)
    assert (model.layers[0].feed_forward.w1.weight == 127).all()
    assert torch.allclose(model.layers[0].feed_forward.w1.weight_scale, torch.full((1,), 0.5 / 127))


def test_cpu_auto_dtype_is_bfloat16_when_float32_would_not_fit(tiny, tmp_path, monkeypatch):
    import zimage.devices as devices

    f32, bf16 = (devices.estimate(tiny, d, 64, 64, 1, False).peak("none") for d in (torch.float32, torch.bfloat16))
    monkeypatch.setattr(devices, "native_bf16", lambda: None)
    monkeypatch.setattr(devices, "available_bytes", lambda device: (f32 + bf16) // 2)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-o", str(out), "--width", "64",
                                      "--height", "64", "--num-steps", "1", "--cpu", "-p", "a cat"])
    assert result.exit_code == 0, result.output
    assert "dtype bfloat16: float32 would need about" in result.output and out.is_file()
