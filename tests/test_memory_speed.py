"""Memory and speed features keep the output exact: offloading, block streaming, compile, lean loading, tiling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

import zimage.pipeline
from zimage.cli import app
from zimage.offload import BlockStreamer
from zimage.pipeline import load_transformer, load_vae
from zimage.transformer import ONEDNN_LINEAR, ZImageTransformer
from zimage.vae import AutoencoderKL
from zimage.tensorfile import stream, tensor_entries
from zimage.weights import checkpoint_header

CPU = torch.device("cpu")
SRC = Path(zimage.pipeline.__file__).resolve().parents[1]  # the zimage under test, for child processes


def generate(tiny, out, *extra):
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompt", "a quiet harbour at dusk",
                                      "--width", "96", "--height", "64", "--seed", "11", "--negative-prompt", "fog",
                                      "--output", str(out), "-q", "--dtype", "float32", *extra])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    return generate(tiny, tmp_path_factory.mktemp("base") / "base.png")


def spy_offload(monkeypatch) -> dict[str, list]:
    """Evidence that an offload mode really ran: for `sequential`, each block entered with weights that are copies,
    not its host weights; for `model`, the transformer's moves (to the compute device and back)."""
    seen: dict[str, list] = {"sequential": [], "model": []}
    real_enter, real_to = BlockStreamer._enter, torch.nn.Module.to

    def enter(self, i):
        real_enter(self, i)
        seen["sequential"].append(all(p.data_ptr() != h.data_ptr() for p, h in zip(self.params[i], self.host[i])))

    def to(self, *args, **kwargs):
        if isinstance(self, ZImageTransformer) and (args or "device" in kwargs):
            seen["model"].append(str(args[0] if args else kwargs["device"]))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(BlockStreamer, "_enter", enter)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    return seen


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_give_the_same_image(tiny, tmp_path, baseline, offload, monkeypatch):
    """The image is the same, and the mode really ran: blocks computed with streamed copies of their weights
    (sequential), or the transformer moved to the compute device and back (model). On the CPU the moves of
    `model` are no-ops; tests/test_gpu_paths.py tells them apart, and gpu_check.sh runs both on a GPU."""
    seen = spy_offload(monkeypatch)
    image = generate(tiny, tmp_path / "o.png", "--offload", offload)
    assert np.abs(image - baseline).max() <= 2
    if offload == "sequential":
        assert seen["sequential"] and all(seen["sequential"])
    else:
        assert seen["model"] == ["cpu", "cpu"]


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


LOAD = """
import json, sys
from pathlib import Path
import torch
from zimage.pipeline import load_transformer

torch.set_num_threads(1)
torch.ones(1).to(torch.bfloat16)  # torch sets up its kernels before the baseline
print("ready", flush=True)
sys.stdin.readline()
model = load_transformer(Path(sys.argv[1]), torch.device("cpu"), torch.bfloat16)
print(json.dumps({"model": sum(p.numel() * p.element_size() for p in model.parameters())}), flush=True)
sys.stdin.readline()
"""


def rss_anon(pid: int) -> int:
    """Resident anonymous memory of a process: what it allocated (file pages of its memory maps excluded)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A float32 transformer of ~320 MB, big enough that a float32 copy would stand out from the process's noise."""
    from zimage.tiny import TinySpec, make_tiny

    return make_tiny(tmp_path_factory.mktemp("medium") / "m", TinySpec(dim=1024, n_layers=4, n_heads=8,
                                                                       axes_dims=(32, 48, 48)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc")
def test_lean_loading_converts_tensor_by_tensor(medium):
    """The float32 checkpoint becomes bfloat16 without a float32 copy of the model: a real load, in a fresh
    process, grows its anonymous memory by about the bfloat16 model's size (a float32 copy would add twice that)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", LOAD, str(medium)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        base = peak = rss_anon(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        # sampled from outside, so the child's own threads are not slowed by the sampling
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(child.stdout.readline()))
        reader.start()
        while reader.is_alive():
            peak = max(peak, rss_anon(child.pid))
            time.sleep(0.001)
        peak = max(peak, rss_anon(child.pid))
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait() == 0
    finally:
        child.kill()
    model = json.loads(result[0])["model"]
    grown = peak - base
    assert model > 100 * 2**20
    assert grown < 1.5 * model, f"load grew memory by {grown / 2**20:.0f} MiB for a {model / 2**20:.0f} MiB model"


def shard_tensors(checkpoints):
    folder = checkpoints["sharded"] / "transformer"
    header = checkpoint_header(folder, "diffusion_pytorch_model")
    for path in sorted({p for p, _ in header.values()}):
        names = [k for k, (p, _) in header.items() if p == path]
        with safe_open(str(path), framework="pt") as f:
            yield path, {n: f.get_tensor(n) for n in names}


def test_stream_gives_every_tensor_as_stored_in_file_order_through_two_buffers(checkpoints):
    for path, expected in shard_tensors(checkpoints):
        seen, stages = [], set()
        for name, t, stage in stream(path, list(expected)):
            assert torch.equal(t, expected[name]) and t.dtype == expected[name].dtype, name
            seen.append(name)
            stages.add(id(stage))
        starts = tensor_entries(path)
        assert seen == sorted(expected, key=lambda n: starts[n][2]) and len(stages) == 2


def test_stream_reads_through_the_page_cache_where_o_direct_is_refused(checkpoints, monkeypatch):
    import zimage.tensorfile as tensorfile

    real_open, refused = tensorfile.os.open, []

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(tensorfile.os, "open", no_direct)
    for path, expected in shard_tensors(checkpoints):
        assert all(torch.equal(t, expected[name]) for name, t, _ in stream(path, list(expected)))
    assert refused or not getattr(os, "O_DIRECT", 0)


def test_a_file_cut_short_inside_a_tensor_is_a_weights_error(checkpoints, tmp_path):
    path, expected = next(shard_tensors(checkpoints))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(OSError, match="file ends at byte"):
        list(stream(cut, list(expected)))


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


def test_vae_tiling_flag_decodes_in_tiles_close_to_the_whole(tiny, tmp_path, monkeypatch):
    """--vae-tiling really tiles (576 px is wider than one 512 px tile) and gives the untiled image to within
    rounding of the shared statistics."""
    tiled_calls = []
    real = AutoencoderKL._decode_tiled
    monkeypatch.setattr(AutoencoderKL, "_decode_tiled", lambda self, *a: tiled_calls.append(a[1:]) or real(self, *a))
    size = ["--width", "576", "--height", "64", "--num-steps", "2"]
    whole = generate(tiny, tmp_path / "w.png", *size)
    assert tiled_calls == []
    tiled = generate(tiny, tmp_path / "t.png", *size, "--vae-tiling")
    assert tiled_calls == [(64, 16)]
    assert tiled.shape == whole.shape == (64, 576, 3)
    assert np.abs(tiled - whole).mean() <= 3


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
