"""What only happens on a GPU, checked on the CPU: dtypes that MPS lacks, pinned host buffers, side streams and
their events, released models, torch.compile around hooks, real-valued RoPE, GPU defaults and memory checks.

The CUDA and MPS pieces are injected (stream and event stand-ins, a pinning function, mocked memory queries), and
a TorchDispatchMode spies on every tensor an operator makes. Tests marked `cuda` run the real thing on a GPU
(scripts/gpu_check.sh) and skip elsewhere.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

import zimage.devices
import zimage.offload
import zimage.pipeline
from zimage import rope as rope_mod
from zimage.cli import app
from zimage.devices import Needs, choose_offload, estimate, pick_dtype
from zimage.jobs import Job, Settings, UsageError
from zimage.offload import ALIGN, BlockStreamer, StreamOps
from zimage.pipeline import Options, Pipeline, load_transformer
from zimage.rope import Rope, RopeTables, rotate_complex, rotate_real
from zimage.scheduler import get_sigmas
from zimage.text_encoder import TextEncoder
from zimage.tiling import GroupNorm, merge_moments

CPU = torch.device("cpu")
BAD = (torch.float64, torch.complex128)


# ------------------------------------------------------------------------------------------------------ helpers

class DtypeSpy(TorchDispatchMode):
    """Records (op, dtype, device, python functions on the stack) for every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, torch.dtype, torch.device, set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (t.dtype in BAD or t.is_complex()):
                frames, f = set(), sys._getframe(1)
                while f is not None:
                    frames.add(f.f_code.co_qualname)
                    f = f.f_back
                self.made.append((str(func), t.dtype, t.device, frames))
        return out


# Host-side computations allowed to use float64 on the CPU (never moved to the device before becoming float32):
# the sigma schedule (as the reference's numpy) and the RoPE angle tables (positions up to 1535 times frequencies).
HOST_FLOAT64 = {"get_sigmas", "rope_angles"}
# complex64 only in the eager CPU RoPE kernel (a single fused multiply there); GPUs and compile take the real one.
CPU_COMPLEX64 = {"rotate_complex", "with_cis", "Rope.expand"}


def forbidden(made) -> list:
    bad = []
    for op, dtype, device, frames in made:
        if dtype == torch.float64 and device.type == "cpu" and frames & HOST_FLOAT64:
            continue
        if dtype == torch.complex64 and device.type == "cpu" and frames & CPU_COMPLEX64:
            continue
        bad.append((op, dtype, device, sorted(frames & {"decode", "_decode_tiled", "denoise", "encode", "forward"})))
    return bad


def job(tiny: Path, out: Path, width=96, height=64, steps=2, guidance=0.0) -> Job:
    s = Settings(prompt="a lighthouse", negative_prompt="fog", width=width, height=height, num_steps=steps, seed=3,
                 guidance_scale=guidance)
    return Job(s, out, 0, "test", str(tiny))


def run(opts: Options, jobs: list[Job]) -> None:
    Pipeline(opts).run(jobs, 1, lambda j, s: None, lambda j, m: pytest.fail(m))


def fake_pin(log: list[int]):
    def pin(nbytes: int) -> torch.Tensor:
        log.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)
    return pin


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append(("wait", self.name, event.n))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name))


class FakeEvent:
    def __init__(self, log: list):
        self.log, self.n = log, sum(1 for e in log if e[0] == "event")
        log.append(("event", self.n))

    def record(self, stream) -> None:
        self.log.append(("record", stream.name, self.n))


def fake_streams(log: list) -> StreamOps:
    main = FakeStream("main", log)

    @contextmanager
    def use(stream):
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    return StreamOps(new_stream=lambda device: FakeStream("side", log), new_event=lambda: FakeEvent(log), use=use,
                     current=lambda device: main,
                     record=lambda t, s: log.append(("record_stream", s.name, t.untyped_storage().data_ptr())))


def blocks_of(model) -> list[torch.nn.Module]:
    return [*model.noise_refiner, *model.context_refiner, *model.layers]


def inputs(model, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 16, 8, 8, generator=gen), torch.rand(batch, generator=gen),
            [torch.randn(5 + 3 * i, model.cfg.cap_feat_dim, generator=gen) for i in range(batch)])


COLLECT = gc.collect  # the real one, while a test records calls to it


@contextmanager
def gc_off():
    COLLECT()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ------------------------------------------------------------------------ 1. no float64 / complex128 on device

def test_tiled_decode_statistics_are_float32_and_as_exact_as_float64():
    """Group-norm statistics of a tiled decode are merged part by part in float32 (MPS has no float64), and match
    a float64 computation even where sums of squares would cancel (a large mean against a small spread)."""
    gen = torch.Generator().manual_seed(0)
    x = 300.0 + 0.05 * torch.randn(2, 32, 40, 56, generator=gen)
    norm = GroupNorm(8, 32, 1e-6)
    spy = DtypeSpy()
    with spy:
        for y0, y1 in ((0, 0.3), (0.3, 0.55), (0.55, 1.0)):  # uneven parts, as tiles own them
            for x0, x1 in ((0, 0.5), (0.5, 1.0)):
                norm.owned = (y0, y1, x0, x1)
                norm(x)
        norm.owned = None
        norm.fix()
    assert not [m for m in spy.made if m[1] in BAD], spy.made[:3]
    mean, var = norm.fixed
    g = x.double().reshape(2, 8, -1)
    assert mean.dtype == var.dtype == torch.float32
    assert torch.allclose(mean.double(), g.mean(-1), rtol=1e-7, atol=0)
    assert torch.allclose(var.double(), g.var(-1, correction=0), rtol=1e-4, atol=0)


def test_merged_moments_equal_the_whole():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 1000, generator=gen) + 50, torch.randn(3, 10, generator=gen) * 3
    parts = [(t.mean(-1), t.var(-1, correction=0) * t.shape[-1], t.shape[-1]) for t in (a, b)]
    mean, m2, n = merge_moments(parts[0], parts[1])
    whole = torch.cat([a, b], -1).double()
    assert n == 1010
    assert torch.allclose(mean.double(), whole.mean(-1), rtol=1e-6)
    assert torch.allclose((m2 / n).double(), whole.var(-1, correction=0), rtol=1e-5)


@pytest.mark.parametrize("tile", [None, 24], ids=["decode", "tiled-decode"])
def test_no_float64_or_complex128_is_made_on_the_compute_device_in_a_run(tiny, tmp_path, tile):
    """A whole run (encode, denoise with CFG, decode whole or tiled) makes no float64 or complex tensor, except the
    two host-side tables computed on the CPU (HOST_FLOAT64) and the CPU-only complex RoPE kernel."""
    spy = DtypeSpy()
    with spy:
        run(Options(tiny, CPU, torch.float32, vae_tile=tile, progress=False),
            [job(tiny, tmp_path / "a.png", width=256, height=128, guidance=2.0)])
    assert (tmp_path / "a.png").exists()
    assert forbidden(spy.made) == []
    assert any(m[1] == torch.float64 for m in spy.made)  # the spy does see the host tables


# ------------------------------------------------------------------------------------------ 6. real-valued RoPE

def polar_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The complex RoPE this project used before (and diffusers uses): view_as_complex times polar(1, angle)."""
    freqs = torch.polar(torch.ones_like(angles), angles)
    out = torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs)
    return out.flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_equals_the_complex_one_to_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 40, 3, 32
    x = torch.randn(b, s, h, d, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous, as q and k are
    angles = torch.rand(b, 1, s, d // 2, generator=gen) * 1500
    rope = Rope(angles.cos(), angles.sin())
    expected = polar_rope(x, angles)
    for got in (rotate_real(x, rope), rotate_complex(x, rope)):
        assert got.dtype == dtype and got.shape == x.shape
        tol = 1e-5 if dtype == torch.float32 else 0.04  # bfloat16: one rounding of values up to ~4
        assert (got.float() - expected.float()).abs().max() <= tol
    assert (rotate_real(x, rope).float() - rotate_complex(x, rope).float()).abs().max() <= tol


def test_rope_off_the_cpu_is_real_valued():
    """On any device but the CPU (here: meta tensors, as a stand-in that runs no kernels) RoPE makes no complex
    tensor and no float64: Inductor's CUDA code generation breaks on complex64, MPS has no float64."""
    tables = RopeTables(256.0, (8, 12, 12), (64, 32, 32))
    ids = torch.zeros(1, 1, 10, 3, dtype=torch.long, device="meta")
    x = torch.empty(1, 2, 10, 32, device="meta", dtype=torch.bfloat16)
    spy = DtypeSpy()
    with spy:
        rope = tables(ids)
        out = rope_mod.apply_rope(x, rope)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert rope.cos.device.type == "meta" and rope.cos.dtype == torch.float32
    assert [m for m in spy.made if m[2].type != "cpu"] == []


def test_transformer_with_real_rope_equals_the_cpu_default(tiny, monkeypatch):
    model = load_transformer(tiny, CPU, torch.float32)
    args = inputs(model, 2)
    with torch.inference_mode():
        default = model(*args)
        monkeypatch.setattr("zimage.transformer.apply_rope", rotate_real)
        real = model(*args)
    assert (real - default).abs().max() <= 1e-5 * default.abs().max()


# ------------------------------------------------------------------- 3 and 7. block streamer: pinning, streams

def test_streamer_packs_each_block_into_one_exact_buffer_and_frees_the_originals(tiny):
    """Each block's weights go into one buffer of their exact size (PyTorch's pinned allocator would round each
    allocation up to a power of two), and each block's original weights are freed before the next is packed, so
    the host never holds the model twice."""
    model = load_transformer(tiny, CPU, torch.float32)
    blocks = blocks_of(model)
    originals = [[weakref.ref(p.untyped_storage()) for p in b.parameters()] for b in blocks]
    sizes: list[int] = []
    alive_at_pin: list[int] = []

    def pin(nbytes):
        packed = len(sizes)
        alive_at_pin.append(sum(r() is not None for refs in originals[:packed] for r in refs))
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    with gc_off():
        streamer = BlockStreamer(model, blocks, CPU, pin=pin)
        assert all(r() is None for refs in originals for r in refs)
    assert alive_at_pin == [0] * len(blocks)
    for size, b in zip(sizes, blocks):
        params = list(b.parameters())
        exact = sum(p.numel() * p.element_size() for p in params)
        assert exact <= size < exact + ALIGN * len(params)
    flats = streamer.flat
    for b, flat in zip(blocks, flats):  # the host weights are views of the block's buffer
        base = flat.data_ptr()
        assert all(base <= p.data_ptr() < base + flat.numel() for p in b.parameters())
    streamer.remove()


def test_streamer_waits_for_each_copy_and_records_the_compute_stream(tiny):
    """With a side stream, every block's weights are copied there, the compute stream waits on the copy's event
    before the block runs, and the copies are recorded as used by the compute stream (or the allocator could
    reuse them while the block still reads them)."""
    model = load_transformer(tiny, CPU, torch.float32)
    args = inputs(model)
    with torch.inference_mode():
        expected = model(*args)
    blocks = blocks_of(model)
    log: list = []
    streamer = BlockStreamer(model, blocks, CPU, pin=fake_pin([]), streams=fake_streams(log))
    host = [[p.data_ptr() for p in b.parameters()] for b in blocks]
    seen = []

    def check(module, _args):
        i = blocks.index(module)
        waits = [e for e in log if e[0] == "wait"]
        recorded = {e[2] for e in log if e[0] == "record_stream" and e[1] == "main"}
        events_recorded_on_side = {e[2] for e in log if e[0] == "record" and e[1] == "side"}
        assert waits and waits[-1][1] == "main" and waits[-1][2] in events_recorded_on_side
        assert {p.untyped_storage().data_ptr() for p in module.parameters()} <= recorded
        assert all(p.data_ptr() != h.data_ptr() for p, h in zip(module.parameters(), streamer.host[i]))
        seen.append(i)

    handles = [b.register_forward_pre_hook(check) for b in blocks]  # after the streamer's: sees the swapped weights
    with torch.inference_mode():
        got = model(*args)
    assert seen == list(range(len(blocks)))
    assert sum(1 for e in log if e[0] == "wait") == len(blocks)
    copies_inside_side = [e for e in log if e[0] in ("enter", "exit")]
    assert copies_inside_side[:2] == [("enter", "side"), ("exit", "side")]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for h in handles:
        h.remove()
    streamer.remove()
    assert ("sync", "side") in log  # no buffer is let go while a prefetch may still read it
    assert [[p.data_ptr() for p in b.parameters()] for b in blocks] == host  # back on the host weights


def test_streamer_defaults_pin_and_stream_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(zimage.offload, "pinned_buffer", lambda n: calls.append(n) or torch.empty(n, dtype=torch.uint8))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    cpu = BlockStreamer(model, list(model), CPU)
    assert cpu.pin is None and cpu.streams is None and calls == []
    cpu.remove()


# ------------------------------------------------------------- 2. released models leave nothing alive, no gc

@pytest.fixture
def no_gc_needed(monkeypatch):
    """gc off, and gc.collect in the pipeline recorded: a release must free everything by reference counting."""
    collects: list[int] = []
    monkeypatch.setattr(zimage.pipeline.gc, "collect", lambda *a: collects.append(1) or 0)
    with gc_off():
        yield collects


def test_streamed_text_encoder_leaves_nothing_alive(tiny, monkeypatch, no_gc_needed):
    refs: list[weakref.ref] = []
    real_load, real_init = TextEncoder.load.__func__, BlockStreamer.__init__

    def load(cls, *a, **k):
        enc = real_load(cls, *a, **k)
        refs.extend(weakref.ref(m) for m in [enc.model, *enc.model.layers])
        refs.extend(weakref.ref(p.untyped_storage()) for p in enc.model.layers.parameters())
        return enc

    def init(self, *a, **k):
        refs.append(weakref.ref(self))
        real_init(self, *a, **k)

    monkeypatch.setattr(TextEncoder, "load", classmethod(load))
    monkeypatch.setattr(BlockStreamer, "__init__", init)
    pipe = Pipeline(Options(tiny, CPU, torch.float32, offload="sequential", progress=False))
    feats = pipe.encode(["a lighthouse"])
    assert feats["a lighthouse"].ndim == 2
    assert len(refs) > 3
    assert [r for r in refs if r() is not None] == []
    assert no_gc_needed == []


@pytest.mark.parametrize("offload, compile_", [("sequential", False), ("none", True), ("sequential", True)])
def test_released_transformer_leaves_nothing_alive(tiny, monkeypatch, no_gc_needed, offload, compile_):
    pipe = Pipeline(Options(tiny, CPU, torch.float32, offload=offload, compile=compile_, progress=False))
    pipe.load_denoiser()
    refs = [weakref.ref(m) for m in [pipe.transformer, *pipe.blocks]]
    refs += [weakref.ref(p.untyped_storage()) for b in pipe.blocks for p in b.parameters()]
    if pipe.streamer is not None:
        refs.append(weakref.ref(pipe.streamer))
    pipe.release_transformer()
    assert [r for r in refs if r() is not None] == []
    assert no_gc_needed == []
    pipe.close()


# ------------------------------------------------------------------------- 5. compile keeps hooks out of graphs

def test_compiled_streamed_blocks_trace_no_hooks_and_share_graphs(checkpoints, monkeypatch):
    """With --compile and --offload sequential the streamer's hooks run eagerly (never traced: on CUDA they swap
    `.data` and touch streams and events), and blocks of one kind share one graph instead of recompiling per block
    (dynamo gives up after 8)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: real_compile(*a, **{**k, "backend": backend}))
    traced_hooks = []
    real_enter = BlockStreamer._enter
    monkeypatch.setattr(BlockStreamer, "_enter",
                        lambda self, i: traced_hooks.append(torch.compiler.is_compiling()) or real_enter(self, i))
    torch._dynamo.reset()
    model_path = checkpoints["sharded"]  # 2 + 2 refiner blocks and 3 main blocks
    pipe = Pipeline(Options(model_path, CPU, torch.float32, offload="sequential", compile=True, progress=False))
    pipe.load_denoiser()
    eager = load_transformer(model_path, CPU, torch.float32)
    args = inputs(eager)
    with torch.inference_mode():
        expected = eager(*args)
        for _ in range(2):
            got = pipe.transformer(*args)
    pipe.close()
    torch._dynamo.reset()
    assert traced_hooks and not any(traced_hooks)
    assert 1 <= len(graphs) <= 3  # one per kind of block: noise refiner, context refiner, main
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- 7. GPU defaults

@pytest.mark.parametrize("device, expected", [("cuda", torch.bfloat16), ("mps", torch.bfloat16),
                                              ("cpu", torch.float32)])
def test_default_dtype_is_bfloat16_on_gpus(device, expected):
    assert pick_dtype(None, torch.device(device), False) == expected
    assert pick_dtype("auto", torch.device(device), False) == expected


def test_vae_upcasts_to_float32_when_the_run_is_bfloat16(tiny, fresh_tiny):
    """force_upcast in vae/config.json (the published one sets it) keeps the VAE in float32 in a bfloat16 run, as
    on a GPU; without it the VAE takes the run's dtype."""
    pipe = Pipeline(Options(tiny, CPU, torch.bfloat16, progress=False))
    pipe.load_denoiser()
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    pipe.close()
    cfg = fresh_tiny / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "force_upcast": False}))
    pipe = Pipeline(Options(fresh_tiny, CPU, torch.bfloat16, progress=False))
    pipe.load_denoiser()
    assert pipe.vae.dtype == torch.bfloat16
    pipe.close()


def test_offload_model_moves_the_transformer_and_vae_to_the_device_and_back(tiny, tmp_path, monkeypatch):
    """--offload model puts the transformer on the compute device for denoising and takes it back after, and the
    VAE likewise for decoding. The compute device is named "cpu:0" so moves to it and back to "cpu" differ."""
    moves: list[tuple[str, str]] = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if target is not None and isinstance(self, (zimage.pipeline.ZImageTransformer, zimage.pipeline.AutoencoderKL)):
            moves.append((type(self).__name__, str(target)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    ran_after = []
    real_forward = zimage.pipeline.ZImageTransformer.forward
    monkeypatch.setattr(zimage.pipeline.ZImageTransformer, "forward",
                        lambda self, *a: ran_after.append(moves[-1]) or real_forward(self, *a))
    run(Options(tiny, torch.device("cpu", 0), torch.float32, offload="model", progress=False),
        [job(tiny, tmp_path / "a.png")])
    assert ran_after and set(ran_after) == {("ZImageTransformer", "cpu:0")}
    assert moves == [("ZImageTransformer", "cpu:0"), ("ZImageTransformer", "cpu"),
                     ("AutoencoderKL", "cpu:0"), ("AutoencoderKL", "cpu")]


GiB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory query and the host's RAM, mocked: set mem['gpu'] and mem['host'] in bytes."""
    mem = {"gpu": 0, "host": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (mem["gpu"], 80 * GiB))
    monkeypatch.setattr(zimage.devices.psutil, "virtual_memory",
                        lambda: type("vm", (), {"available": mem["host"]})())
    return mem


NEEDS = Needs(text_encoder=8 * GiB, transformer=12 * GiB, block=GiB // 2, vae=GiB // 4, denoise_work=GiB,
              decode_work=2 * GiB)


@pytest.mark.parametrize("gpu, mode", [(40, "none"), (14, "model"), (4, "sequential")])
def test_automatic_offload_takes_the_lightest_mode_that_fits(fake_cuda, gpu, mode):
    fake_cuda.update(gpu=gpu * GiB, host=64 * GiB)
    chosen, note = choose_offload(NEEDS, torch.device("cuda"), torch.bfloat16, None)
    assert chosen == mode
    assert (note is None) == (mode == "none")


def test_offload_modes_need_their_weights_in_host_ram(fake_cuda):
    """Offloading keeps the weights in host RAM: a machine with too little RAM is told so before loading."""
    fake_cuda.update(gpu=4 * GiB, host=6 * GiB)
    with pytest.raises(UsageError, match=r"not enough host memory \(RAM\) for --offload sequential"):
        choose_offload(NEEDS, torch.device("cuda"), torch.bfloat16, None)
    fake_cuda.update(gpu=14 * GiB)
    with pytest.raises(UsageError, match="not enough host memory"):
        choose_offload(NEEDS, torch.device("cuda"), torch.bfloat16, "model")
    fake_cuda.update(host=10 * GiB)  # room on the GPU for model offload, not in RAM, and streaming needs as much
    with pytest.raises(UsageError, match="not enough host memory"):
        choose_offload(NEEDS, torch.device("cuda"), torch.bfloat16, None)
    fake_cuda.update(host=13 * GiB)
    assert choose_offload(NEEDS, torch.device("cuda"), torch.bfloat16, None)[0] == "model"
    assert NEEDS.host("none") == 0 and NEEDS.host("sequential") == NEEDS.transformer + NEEDS.vae


# ----------------------------------------------------------------------------- 4. tiling in the memory check

def test_vae_tiling_shrinks_the_decode_estimate(tiny):
    plain = estimate(tiny, torch.bfloat16, 2048, 2048, 1, False)
    tiled = estimate(tiny, torch.bfloat16, 2048, 2048, 1, False, vae_tile=64)
    assert tiled.decode_work < plain.decode_work / 4
    # a tile's maps no longer grow with the image: 4x the pixels cost far less than 4x the memory
    bigger = estimate(tiny, torch.bfloat16, 4096, 4096, 1, False, vae_tile=64)
    assert bigger.decode_work < 4 * tiled.decode_work * 0.75
    assert tiled.decode_work > 3 * 2048 * 2048 * 4  # the float32 image itself is still whole


def test_vae_tiling_lets_a_large_image_pass_the_gpu_memory_check(tiny, tmp_path, monkeypatch, fake_cuda):
    """2048x2048 on a GPU with 4 GiB free: refused without --vae-tiling, accepted with it."""
    monkeypatch.setattr(zimage.devices, "pick_device", lambda name, cpu: torch.device("cuda"))
    fake_cuda.update(gpu=4 * GiB, host=64 * GiB)
    started = []

    class Stub:
        def __init__(self, opts):
            started.append(opts)

        def run(self, *a):
            pass

    monkeypatch.setattr(zimage.pipeline, "Pipeline", Stub)
    args = ["generate", "--model-path", str(tiny), "-p", "a cat", "--width", "2048", "--height", "2048", "-q",
            "--seed", "1", "-o", str(tmp_path / "a.png")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "not enough GPU memory" in refused.stderr and started == []
    CliRunner().invoke(app, [*args, "--vae-tiling"])
    assert len(started) == 1 and started[0].vae_tile == 64


# ------------------------------------------------------------------------- on a GPU: scripts/gpu_check.sh


def need_cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.mark.cuda
def test_gpu_bfloat16_transformer_matches_cpu_float32(tiny, accelerator):
    device = accelerator
    cpu = load_transformer(tiny, CPU, torch.float32)
    gpu = load_transformer(tiny, device, torch.bfloat16)
    x, t, caps = inputs(cpu, 2)
    with torch.inference_mode():
        expected = cpu(x, t, caps)
        got = gpu(x.to(device), t.to(device), [c.to(device) for c in caps]).float().cpu()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.cuda
def test_gpu_run_makes_no_float64_or_complex(tiny, tmp_path, accelerator):
    device = accelerator
    spy = DtypeSpy()
    with spy:
        run(Options(tiny, device, torch.bfloat16, vae_tile=24, progress=False),
            [job(tiny, tmp_path / "a.png", width=256, height=128, guidance=2.0)])
    assert [m for m in spy.made if m[2].type != "cpu"] == []


@pytest.mark.cuda
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_gpu_offload_gives_the_image_of_no_offload(tiny, tmp_path, offload):
    device = need_cuda()
    import numpy as np
    from PIL import Image

    images = {}
    for mode in ("none", offload):
        run(Options(tiny, device, torch.bfloat16, offload=mode, progress=False), [job(tiny, tmp_path / f"{mode}.png")])
        images[mode] = np.asarray(Image.open(tmp_path / f"{mode}.png")).astype(int)
    assert np.abs(images[offload] - images["none"]).max() <= 1


@pytest.mark.cuda
def test_gpu_streamer_pins_exactly_and_keeps_two_blocks_resident(tiny):
    device = need_cuda()
    model = load_transformer(tiny, CPU, torch.bfloat16)
    blocks = blocks_of(model)
    x, t, caps = inputs(model)
    with torch.inference_mode():
        expected = model(x, t, caps).float()
    streamer = BlockStreamer(model, blocks, device)
    assert all(flat.is_pinned() for flat in streamer.flat)
    assert all(p.device.type == "cpu" for b in blocks for p in b.parameters())
    resident = []
    hooks = [b.register_forward_pre_hook(lambda m, a: resident.append(
        sum(any(p.device.type == "cuda" for p in b.parameters()) for b in blocks))) for b in blocks]
    with torch.inference_mode():
        got = model(x.to(device), t.to(device), [c.to(device) for c in caps]).float().cpu()
    for h in hooks:
        h.remove()
    streamer.remove()
    assert max(resident) == 1  # the running block's weights swapped in; the next one's copy is in flight
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.cuda
def test_gpu_compiled_blocks_match_eager(tiny):
    device = need_cuda()
    eager = load_transformer(tiny, device, torch.bfloat16)
    compiled = load_transformer(tiny, device, torch.bfloat16)
    from zimage.compiling import compile_blocks

    compile_blocks(blocks_of(compiled))
    x, t, caps = inputs(eager)
    x, t, caps = x.to(device), t.to(device), [c.to(device) for c in caps]
    with torch.inference_mode():
        a, b = eager(x, t, caps).float(), compiled(x, t, caps).float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


@pytest.mark.cuda
def test_gpu_tiled_decode_matches_cpu(tiny, accelerator):
    device = accelerator
    from zimage.pipeline import load_vae

    gen = torch.Generator().manual_seed(0)
    latents = torch.nn.functional.interpolate(torch.randn(1, 16, 5, 7, generator=gen), size=(40, 56), mode="bicubic")
    cpu = load_vae(tiny, CPU, torch.float32).decode(latents, tile=24)
    gpu = load_vae(tiny, device, torch.float32).decode(latents.to(device), tile=24).cpu()
    assert (gpu - cpu).abs().max() <= 1e-2


def test_sigmas_are_float32_when_they_leave_the_host(tiny):
    from zimage.scheduler import SchedulerConfig

    cfg = SchedulerConfig.from_json(tiny / "scheduler" / "scheduler_config.json")
    assert get_sigmas(cfg, 8, 4096).dtype == torch.float32
