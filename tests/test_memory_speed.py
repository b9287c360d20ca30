"""Memory and speed features keep the output exact: offloading, block streaming, compile, lean loading, tiling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from zimage.cli import app
from zimage.offload import BlockStreamer
from zimage.pipeline import load_transformer, load_vae
from zimage.transformer import ONEDNN_LINEAR, ZImageTransformer
from zimage.weights import READ_GROUP_BYTES, checkpoint_header, read_groups

CPU = torch.device("cpu")


def generate(tiny, out, *extra):
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompt", "a quiet harbour at dusk",
                                      "--width", "96", "--height", "64", "--seed", "11", "--negative-prompt", "fog",
                                      "--output", str(out), "-q", "--dtype", "float32", *extra])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    return generate(tiny, tmp_path_factory.mktemp("base") / "base.png")


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_give_the_same_image(tiny, tmp_path, baseline, offload):
    assert np.abs(generate(tiny, tmp_path / "o.png", "--offload", offload) - baseline).max() <= 2


def test_compiled_blocks_give_the_same_image(tiny, tmp_path, baseline):
    pytest.importorskip("torch._inductor")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    assert np.abs(generate(tiny, tmp_path / "c.png", "--compile") - baseline).max() <= 2


@torch.inference_mode()
def test_block_streamer_keeps_outputs_and_leaves_weights_on_the_host(tiny):
    model = load_transformer(tiny, CPU, torch.float32)
    x = torch.randn(1, 16, 8, 8)
    t = torch.tensor([0.3])
    caps = [torch.randn(5, model.cfg.cap_feat_dim)]
    expected = model(x, t, caps)
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    host = [p.data_ptr() for b in blocks for p in b.parameters()]
    streamer = BlockStreamer(model, blocks, CPU)
    got = model(x, t, caps)
    streamer.remove()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert [p.data_ptr() for b in blocks for p in b.parameters()] == host


def test_lean_loading_converts_tensor_by_tensor(tiny, monkeypatch):
    """The float32 checkpoint becomes bfloat16 without a float32 copy of the model: each tensor is converted
    as soon as it is read, so at most one float32 tensor is alive at a time."""
    alive = []
    peak = [0]
    real_to = torch.Tensor.to

    def tracking_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.float32 and out.dtype == torch.bfloat16:
            alive.append(self.numel())
            peak[0] = max(peak[0], len(alive))
            alive.clear()
        return out

    monkeypatch.setattr(torch.Tensor, "to", tracking_to)
    model = load_transformer(tiny, CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert peak[0] == 1


def test_reads_are_grouped_in_bounded_runs(checkpoints):
    folder = checkpoints["sharded"] / "transformer"
    header = checkpoint_header(folder, "diffusion_pytorch_model")
    mapping = {k: k for k in header}
    groups = read_groups(header, mapping)
    assert sorted(k for _, keys in groups for k in keys) == sorted(header)
    assert len({path for path, _ in groups}) == 3
    for path, keys in groups:
        assert all(header[k][0] == path for k in keys)
        assert len(keys) == 1 or sum(header[k][1].nbytes for k in keys) <= READ_GROUP_BYTES


def test_no_attention_mask_when_the_batch_needs_none(tiny, monkeypatch):
    """Equal padded caption lengths need no mask, so SDPA may take its fastest kernel."""
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    model = load_transformer(tiny, CPU, torch.float32)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        model(torch.randn(2, 16, 8, 8), torch.rand(2), [torch.randn(3, 48), torch.randn(30, 48)])
        assert masks and all(m is None for m in masks)
        masks.clear()
        model(torch.randn(2, 16, 8, 8), torch.rand(2), [torch.randn(3, 48), torch.randn(40, 48)])
        assert any(m is not None for m in masks)


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="oneDNN linear kernel not in this torch build or not x86")
def test_float32_cpu_linears_run_in_onednn_with_the_same_result(tiny):
    """Every transformer linear takes oneDNN's kernel on a float32 CPU run; outputs equal F.linear's to rounding."""
    model = load_transformer(tiny, CPU, torch.float32)
    args = (torch.randn(2, 16, 8, 8), torch.rand(2), [torch.randn(3, 48), torch.randn(40, 48)])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fast = model(*args)
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls >= len(linears) > 0
    assert not any(e.key in ("aten::linear", "aten::addmm", "aten::mm") for e in prof.key_averages())
    x = torch.randn(3, linears[0].in_features, requires_grad=True)  # autograd on: the path with a backward
    linears[0](x).sum().backward()
    assert torch.allclose(x.grad, linears[0].weight.sum(0).expand_as(x))
    with torch.inference_mode():
        for m in linears:
            m.forward = lambda x, m=m: torch.nn.functional.linear(x, m.weight, m.bias)
        slow = model(*args)
    assert (fast - slow).abs().max() <= 1e-5 * slow.abs().max()


def test_rope_tables_are_built_once_per_device_and_size(tiny, monkeypatch):
    model: ZImageTransformer = load_transformer(tiny, CPU, torch.float32)
    lookups = []
    real = model.rope.__call__
    monkeypatch.setattr(model, "rope", lambda ids: lookups.append(ids.shape) or real(ids))
    with torch.inference_mode():
        for _ in range(3):  # three steps at one size: one lookup per token group
            model(torch.randn(1, 16, 8, 8), torch.rand(1), [torch.randn(3, 48)])
        assert len(lookups) == 2
        model(torch.randn(1, 16, 4, 12), torch.rand(1), [torch.randn(50, 48)])
        assert len(lookups) == 4
    assert list(real.__self__._tables) == [CPU]


@torch.inference_mode()
def test_tiled_decode_has_the_right_size_and_no_seams(tiny):
    vae = load_vae(tiny, CPU, torch.float32)
    # a smooth latent spanning several tiles, like a real image's, rather than white noise
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 16, 5, 7, generator=gen)
    latents = torch.nn.functional.interpolate(coarse, size=(40, 56), mode="bicubic", align_corners=False)
    full = vae.decode(latents)
    tiled = vae.decode(latents, tile=32, overlap=16)  # 2 x 3 tiles
    assert tiled.shape == full.shape == (1, 3, 320, 448)
    to8 = lambda x: ((x / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    assert (to8(tiled) - to8(full)).abs().mean().item() <= 3
    # no seam: where tiles overlap and blend (latent columns 16..48) the picture is as close as elsewhere
    diff = (to8(tiled) - to8(full)).abs()
    assert diff[..., 16 * 8 : 48 * 8].mean().item() <= 3
    assert diff[..., 16 * 8 : 48 * 8].mean().item() <= 2 * diff.mean().item() + 0.5


def test_vae_tiling_flag_runs_end_to_end(tiny, tmp_path, baseline):
    image = generate(tiny, tmp_path / "t.png", "--vae-tiling")
    assert image.shape == baseline.shape


def test_vae_dtype_bfloat16_decodes_close_to_float32(tiny, tmp_path, baseline):
    image = generate(tiny, tmp_path / "b.png", "--vae-dtype", "bfloat16")
    assert image.shape == baseline.shape
    assert 0 < np.abs(image - baseline).mean() <= 3  # a real bfloat16 decode: near, not identical


def test_vae_runs_channels_last_with_the_same_result(tiny):
    vae = load_vae(tiny, CPU, torch.float32)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    latents = torch.randn(1, 16, 8, 12)
    with torch.inference_mode():
        fast = vae.decode(latents)
        vae.to(memory_format=torch.contiguous_format)
        plain = vae.decode(latents)
    assert (fast - plain).abs().max().item() <= 1e-4 * plain.abs().max().item()
