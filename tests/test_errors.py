"""Bad input, broken weights, interruptions: `zimage generate` fails with one clear line and loses nothing.

Every test runs the real command (in-process with CliRunner, or as a subprocess where the exit code, the traceback
or a signal is the point) on a tiny checkpoint or a damaged copy of one, and checks the exit code, the message,
and that no file was created or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import zimage.devices
import zimage.images
import zimage.pipeline
import zimage.text_encoder
import zimage.weights
from zimage.cli import app
from zimage.weights import DOWNLOAD_HINT

ZIMAGE = Path(sys.executable).parent / "zimage"
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "7", "-q", "--dtype", "float32"]
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"
FINAL_BIAS = "all_final_layer.2-1.linear.bias"  # the transformer's last layer: a bad value reaches the latents


# ---------------------------------------------------------------------------------------------------- helpers

def generate(model: Path, *args: str):
    """`zimage generate --model-path MODEL SMALL... ARGS` in-process; later flags override SMALL's."""
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), *SMALL, *args])


def snapshot(*roots: Path) -> dict[str, str | None]:
    """Every folder and file under `roots` with a hash of its bytes: equal snapshots mean nothing was created,
    removed or changed (hidden temporary files included)."""
    out: dict[str, str | None] = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def assert_one_line_error(result, code: int, *phrases: str) -> str:
    """The run failed with `code` and exactly one line on stderr, starting with 'error:', containing every phrase,
    without a traceback. Returns the line."""
    assert result.exit_code == code, f"exit {result.exit_code}, stderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    return line


def part_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.part")) if folder.exists() else []


def assert_valid_image(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.size == (64, 64)


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to damage (a copy is faster than writing a fresh one)."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


@pytest.fixture
def out(tmp_path) -> Path:
    """The folder images go to; created only by the command itself."""
    return tmp_path / "out"



def edit_tensors(path: Path, change) -> None:
    """Rewrite a safetensors file after `change(state)` edits its tensors in place."""
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------- bad settings: exit 2, nothing loaded

SIZES = [
    # width, height, phrases the message must contain
    (1920, 1080, ["1920x1080", "multiples of 16", "Try 1920x1072 or 1920x1088"]),
    (100, 64, ["multiples of 16", "Try 96x64 or 112x64"]),
    (8, 64, ["multiples of 16", "Try 16x64"]),
    (0, 64, ["positive", "0x64"]),
    (64, 0, ["positive", "64x0"]),
    (-16, 64, ["positive", "-16x64"]),
    (64, -64, ["positive", "64x-64"]),
    (8208, 64, ["too large", "at most 8192 px", "Try 8192x64"]),
    (64, 16384, ["too large", "at most 8192 px", "Try 64x8192"]),
    (8200, 1080, ["too large", "at most 8192 px", "Try 8192x1072"]),
]


@pytest.mark.parametrize("width, height, phrases", SIZES, ids=[f"{w}x{h}" for w, h, _ in SIZES])
def test_bad_size_is_refused_before_loading(tiny, out, loads, width, height, phrases):
    before = snapshot(tiny)
    result = generate(tiny, "-p", "a cat", "--width", str(width), "--height", str(height), "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, *phrases)
    assert not out.exists() and loads == []
    assert snapshot(tiny) == before


def test_size_limit_comes_from_the_checkpoints_rope_tables(model, out, loads):
    """A checkpoint whose position tables span 256 patches per side tops out at 256 * 2 * 8 = 4096 px."""
    config = json.loads((model / "transformer" / "config.json").read_text())
    config["axes_lens"] = [1536, 256, 256]
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    result = generate(model, "-p", "a cat", "--width", "4112", "--height", "64", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "at most 4096 px", "Try 4096x64")
    assert not out.exists() and loads == []



@pytest.mark.parametrize("width, height, suggestion", [(0, 64, "Try 16x64"), (64, -64, "Try 64x16")])
def test_zero_or_negative_size_suggests_a_valid_size(tiny, out, width, height, suggestion):
    result = generate(tiny, "-p", "a cat", "--width", str(width), "--height", str(height), "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, suggestion)


def test_the_limits_themselves_are_accepted(tiny, out, monkeypatch):
    """8192 px (16 * 512, the RoPE span) and seed 2**64-1 pass every settings check: the run goes on to the memory
    check (made to fail here, so that nothing is computed), not a size or seed error."""
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: 0)
    for size in (["--width", "8192", "--height", "16"], ["--width", "16", "--height", "8192"]):
        result = generate(tiny, "-p", "a cat", *size, "--seed", str(2**64 - 1), "-o", str(out / "a.png"))
        assert_one_line_error(result, 2, "not enough memory")
    assert not out.exists()


SETTINGS = [
    (["--num-steps", "0"], ["--num-steps must be at least 1", "got 0"]),
    (["--num-steps", "-3"], ["--num-steps must be at least 1", "got -3"]),
    (["--guidance-scale", "-1"], ["--guidance-scale must be 0 or more", "-1"]),
    (["--guidance-scale", "-0.5", "--negative-prompt", "blurry"], ["--guidance-scale must be 0 or more"]),
    (["--seed", "-1"], ["--seed must be between 0 and 2**64-1", "got -1"]),
    (["--seed", str(2**64)], ["--seed must be between 0 and 2**64-1", str(2**64)]),
]


@pytest.mark.parametrize("args, phrases", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_bad_setting_is_refused_before_loading(tiny, out, loads, args, phrases):
    result = generate(tiny, "-p", "a cat", *args, "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, *phrases)
    assert not out.exists() and loads == []


@pytest.mark.parametrize("prompt", ["", "   ", "\t \n "], ids=["empty", "spaces", "whitespace"])
def test_empty_prompt_is_refused_before_loading(tiny, out, loads, prompt):
    result = generate(tiny, "-p", prompt, "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "prompt is empty")
    assert not out.exists() and loads == []


def test_prompts_file_without_prompts_is_refused(tiny, tmp_path, out, loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n   \n")
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "no prompts in", str(prompts))
    assert not out.exists() and loads == []


@pytest.mark.parametrize("name, phrases", [
    ("a.gif", ["unsupported image type '.gif'", ".png", ".jpg", ".webp"]),
    ("a.tiff", ["unsupported image type '.tiff'"]),
    ("a", ["unsupported image type", "(none)"]),
])
def test_unsupported_output_type_is_refused_before_loading(tiny, out, loads, name, phrases):
    result = generate(tiny, "-p", "a cat", "-o", str(out / name))
    assert_one_line_error(result, 2, *phrases)
    assert not out.exists() and loads == []


@pytest.mark.parametrize("name", ["a.jpeg", "A.PNG"])  # .jpg and .webp: see test_batch.py
def test_supported_output_types_are_written(tiny, out, name):
    result = generate(tiny, "-p", "a cat", "--num-steps", "1", "-o", str(out / name))
    assert result.exit_code == 0, result.stderr
    with Image.open(out / name) as im:
        assert im.format == {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[name[2:].lower()]


def test_output_path_that_is_a_directory_is_refused(tiny, tmp_path, loads):
    folder = tmp_path / "looks-like.png"
    (folder / "inside").mkdir(parents=True)
    before = snapshot(tmp_path)
    result = generate(tiny, "-p", "a cat", "-o", str(folder))
    assert_one_line_error(result, 2, str(folder), "is a directory")
    assert snapshot(tmp_path) == before and loads == []



def test_output_path_that_is_a_plain_directory_says_so(tiny, tmp_path):
    folder = tmp_path / "outdir"
    folder.mkdir()
    result = generate(tiny, "-p", "a cat", "-o", str(folder))
    assert_one_line_error(result, 2, str(folder), "is a directory")


def test_output_folder_below_a_file_is_refused(tiny, tmp_path, loads):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    before = snapshot(tmp_path)
    result = generate(tiny, "-p", "a cat", "-o", str(blocker / "sub" / "a.png"))
    assert_one_line_error(result, 2, "cannot create folder", str(blocker), "is a file")
    assert snapshot(tmp_path) == before and loads == []


@pytest.mark.parametrize("below", ["a.png", "new/sub/a.png"], ids=["in-folder", "in-new-subfolder"])
def test_output_folder_not_writable_is_refused(tiny, tmp_path, monkeypatch, loads, below):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere, so make the folder look read-only the way a read-only mount would
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if Path(path) == locked and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    before = snapshot(tmp_path)
    try:
        result = generate(tiny, "-p", "a cat", "-o", str(locked / below))
        assert_one_line_error(result, 2, "cannot write to folder", str(locked), "permission denied")
        assert snapshot(tmp_path) == before and loads == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("name", ["float16", "fp16"])
def test_float16_is_refused_with_the_reason(tiny, out, loads, name):
    result = generate(tiny, "-p", "a cat", "--dtype", name, "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "float16 is refused", "overflow", "--force")
    assert not out.exists() and loads == []


def test_float16_runs_with_force(tiny, out):
    result = generate(tiny, "-p", "a cat", "--dtype", "float16", "--force", "--num-steps", "1",
                      "-o", str(out / "a.png"))
    assert result.exit_code == 0, result.stderr
    assert "refused" not in result.stderr
    assert_valid_image(out / "a.png")


# ------------------------------------------------------------------------ missing files: exit 2, names the file

MISSING = [
    "model_index.json",
    "scheduler", "tokenizer", "text_encoder", "transformer", "vae",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "transformer/config.json",
    "vae/config.json",
    "tokenizer/tokenizer_config.json",
    TEXT_ENCODER, TRANSFORMER, VAE,
]


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("missing", MISSING)
def test_missing_file_is_named(model, out, loads, missing):
    remove(model / missing)
    before = snapshot(model)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    line = assert_one_line_error(result, 2, str(model / missing))
    assert "missing" in line and DOWNLOAD_HINT not in line  # the download command is for the default folder only
    assert not out.exists() and loads == []
    assert snapshot(model) == before


def test_missing_model_folder_is_named(tmp_path, out, loads):
    result = generate(tmp_path / "nowhere", "-p", "a cat", "-o", str(out / "a.png"))
    assert DOWNLOAD_HINT not in assert_one_line_error(result, 2, str(tmp_path / "nowhere"), "not found")
    assert not out.exists() and loads == []


def test_missing_tokenizer_files_are_found_before_loading(model, out, loads):
    """Without tokenizer.json and the vocab.json it could be rebuilt from, the tokenizer cannot load."""
    (model / "tokenizer" / "tokenizer.json").unlink()
    (model / "tokenizer" / "vocab.json").unlink()
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, str(model / "tokenizer" / "tokenizer.json"))
    assert not out.exists() and loads == []


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_missing_shard_listed_in_the_index_is_named(checkpoints, tmp_path, out, loads, component):
    model = Path(shutil.copytree(checkpoints["sharded"], tmp_path / "model"))
    index = next((model / component).glob("*.safetensors.index.json"))
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    (model / component / shard).unlink()
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, str(model / component / shard), index.name)
    assert not out.exists() and loads == []


# ---------------------------------------------------------------------------- not enough memory: exit 2, before

def test_not_enough_memory_says_how_much_and_what_helps(tiny, out, loads, monkeypatch):
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: 1024)
    result = generate(tiny, "-p", "a cat", "--cpu", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "not enough memory", "needs about", "free", "--dtype bfloat16",
                          "--width/--height", "--batch-size")
    assert not out.exists() and loads == []


def needs(model: Path, dtype: torch.dtype, cfg: bool = False) -> int:
    return zimage.devices.estimate(model, dtype, 64, 64, 1, cfg).peak("none")


def test_memory_estimate_follows_the_dtype(tiny, out, monkeypatch):
    """With room for a bfloat16 run but not a float32 one, the CPU's default float32 is refused, bfloat16 runs."""
    fp32, bf16 = needs(tiny, torch.float32), needs(tiny, torch.bfloat16)
    assert bf16 < fp32
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: (fp32 + bf16) // 2)
    refused = generate(tiny, "-p", "a cat", "--cpu", "-o", str(out / "a.png"))
    assert_one_line_error(refused, 2, "not enough memory", "--dtype bfloat16")
    assert not out.exists()
    result = generate(tiny, "-p", "a cat", "--cpu", "--dtype", "bfloat16", "--num-steps", "1", "-o", str(out / "a.png"))
    assert result.exit_code == 0, result.stderr
    assert_valid_image(out / "a.png")


def test_memory_estimate_grows_with_the_checkpoint(checkpoints, tmp_path, monkeypatch):
    """The estimate comes from the checkpoint's tensors: room for the default tiny model is too little for `wide`."""
    small, big = needs(checkpoints["single"], torch.float32), needs(checkpoints["wide"], torch.float32)
    assert small < big
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: small)
    result = generate(checkpoints["wide"], "-p", "a cat", "--cpu", "-o", str(tmp_path / "a.png"))
    assert_one_line_error(result, 2, "not enough memory")
    assert not (tmp_path / "a.png").exists()


def fake_gpu(monkeypatch, free: int) -> None:
    """Run the GPU branch of the memory check without a GPU: the check stops the run before anything touches it."""
    monkeypatch.setattr(zimage.devices, "pick_device", lambda name, cpu: torch.device("cuda"))
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: free)


def test_not_enough_gpu_memory_says_what_helps(tiny, out, loads, monkeypatch):
    fake_gpu(monkeypatch, 1024)
    result = generate(tiny, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "not enough GPU memory", "--offload sequential", "needs about", "free", "--cpu")
    assert not out.exists() and loads == []


def test_not_enough_gpu_memory_for_the_requested_offload_suggests_a_leaner_one(tiny, out, loads, monkeypatch):
    fake_gpu(monkeypatch, 1024)
    result = generate(tiny, "-p", "a cat", "--offload", "model", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "not enough GPU memory for --offload model", "--offload sequential")
    assert not out.exists() and loads == []


def amount(text: str) -> float:
    """Bytes of the first '<number> <unit>' after 'needs about'."""
    m = re.search(r"needs about ([\d.]+) ?([KMG]i?B|B)\b", text)
    assert m, f"no amount after 'needs about' in {text!r}"
    unit = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m[2]]
    return float(m[1]) * unit



def test_not_enough_memory_states_the_amount_needed(tiny, out, monkeypatch):
    """The amount comes from the checkpoint and the image, checked against what is known without `estimate`: at
    least the transformer and VAE weights as stored (float32 files) plus one float32 full-resolution feature map of
    the VAE's first stage, growing by at least that map as the pixels grow, and not a huge constant."""
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: 1024)
    stored = sum(f.stat().st_size for c in ("transformer", "vae") for f in (tiny / c).glob("*.safetensors"))
    channels = json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"][0]
    amounts = {}
    for side in (64, 512):
        result = generate(tiny, "-p", "a cat", "--cpu", "--dtype", "float32", "--width", str(side), "--height",
                          str(side), "-o", str(out / "a.png"))
        assert result.exit_code == 2 and "not enough memory" in result.stderr
        amounts[side] = amount(result.stderr)
        assert amounts[side] >= stored + channels * side * side * 4
    assert amounts[512] - amounts[64] >= channels * (512**2 - 64**2) * 4
    assert amounts[64] <= 20 * (stored + 128 * 64 * 64 * 4)
    # the transformer counts in the run's dtype: bfloat16 saves half of its float32 file
    half = generate(tiny, "-p", "a cat", "--cpu", "--dtype", "bfloat16", "-o", str(out / "a.png"))
    transformer = sum(f.stat().st_size for f in (tiny / "transformer").glob("*.safetensors"))
    assert amounts[64] - amount(half.stderr) == pytest.approx(transformer / 2, rel=0.1)
    assert not out.exists()


def test_not_enough_memory_does_not_suggest_the_dtype_in_use(tiny, out, monkeypatch):
    monkeypatch.setattr(zimage.devices, "available_bytes", lambda device: 1024)
    result = generate(tiny, "-p", "a cat", "--cpu", "--dtype", "bfloat16", "-o", str(out / "a.png"))
    assert_one_line_error(result, 2, "not enough memory")
    assert "--dtype bfloat16" not in result.stderr


# ------------------------------------------------------------- damaged weights: exit 1, names file and tensor

def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(data))


DAMAGE = {
    "transformer truncated to half": (TRANSFORMER, lambda p: truncate(p, 0.5), ["not a readable safetensors file"]),
    "transformer missing its last bytes": (TRANSFORMER, lambda p: truncate(p, 0.999),
                                           ["not a readable safetensors file"]),
    "vae cut inside the header": (VAE, lambda p: truncate(p, 0.00005), ["not a readable safetensors file"]),
    "vae empty": (VAE, lambda p: p.write_bytes(b""), ["not a readable safetensors file"]),
    "text encoder header garbled": (TEXT_ENCODER, garble_header, ["not a readable safetensors file"]),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_corrupted_safetensors_file_is_named(model, out, case):
    rel, damage, phrases = DAMAGE[case]
    damage(model / rel)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, str(model / rel), *phrases, "download it again")
    assert not out.exists()


def test_truncated_shard_is_named(checkpoints, tmp_path, out):
    model = Path(shutil.copytree(checkpoints["sharded"], tmp_path / "model"))
    shard = sorted((model / "transformer").glob("*-of-*.safetensors"))[-1]
    truncate(shard, 0.5)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, str(shard), "not a readable safetensors file")
    assert not out.exists()


TENSORS = {
    # file, edit, phrases: the message names the file and the tensor, with expected vs found
    "transformer wrong shape": (TRANSFORMER, lambda s: s.__setitem__(FINAL_BIAS, torch.zeros(5)),
                                ["diffusion_pytorch_model.safetensors", FINAL_BIAS, "shape [5]", "expected [64]",
                                 "transformer"]),
    "transformer missing tensor": (TRANSFORMER, lambda s: s.pop(FINAL_BIAS),
                                   ["transformer", FINAL_BIAS, "missing"]),
    "transformer unexpected tensor": (TRANSFORMER, lambda s: s.__setitem__("extra.weight", torch.zeros(3)),
                                      ["diffusion_pytorch_model.safetensors", "unexpected tensor 'extra.weight'",
                                       "transformer"]),
    "vae wrong shape": (VAE, lambda s: s.__setitem__("decoder.conv_out.bias", torch.zeros(4)),
                        ["diffusion_pytorch_model.safetensors", "decoder.conv_out.bias", "shape [4]",
                         "expected [3]", "vae"]),
    "text encoder wrong shape": (TEXT_ENCODER, lambda s: s.__setitem__("model.embed_tokens.weight",
                                                                      s["model.embed_tokens.weight"][:, :8].clone()),
                                 ["model.safetensors", "model.embed_tokens.weight", "expected [", "text_encoder"]),
    "text encoder missing tensor": (TEXT_ENCODER, lambda s: s.pop("model.layers.0.mlp.up_proj.weight"),
                                    ["text_encoder", "layers.0.mlp.up_proj.weight", "missing"]),
}


@pytest.mark.parametrize("case", TENSORS)
def test_tensor_that_does_not_fit_the_config_is_named(model, out, case):
    rel, change, phrases = TENSORS[case]
    edit_tensors(model / rel, change)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, *phrases)
    assert not out.exists()


def test_index_entry_pointing_at_the_wrong_shard_is_named(checkpoints, tmp_path, out):
    model = Path(shutil.copytree(checkpoints["sharded"], tmp_path / "model"))
    index = model / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    name = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][name] = shards[1]
    index.write_text(json.dumps(data))
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, str(model / "transformer" / shards[1]), name, "index")
    assert not out.exists()


# ---------------------------------------------------------------------- NaN / Inf: stop, name the step, no image

@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_latents_stop_the_run_without_writing(model, out, value):
    def poison(state):
        state[FINAL_BIAS][0] = value

    edit_tensors(model / TRANSFORMER, poison)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, "NaN or Inf", "at step 1", "no image was written", "--dtype")
    assert not out.exists()


def test_non_finite_latents_in_a_batch_write_nothing(model, tmp_path, out):
    def poison(state):
        state[FINAL_BIAS][:] = float("nan")

    edit_tensors(model / TRANSFORMER, poison)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    result = generate(model, "--prompts-file", str(prompts), "--batch-size", "2", "-o", str(out / "img.png"))
    assert_one_line_error(result, 1, "NaN or Inf", "at step 1")
    assert not out.exists()


def test_non_finite_latents_later_in_a_run_keep_the_images_already_written(tiny, tmp_path, out, monkeypatch):
    """The second of three images goes non-finite at its fourth step: the run stops there, naming the step; the
    first image stays whole and nothing half-made is left."""
    from zimage.scheduler import NonFiniteLatents

    real_denoise = zimage.pipeline.denoise
    calls = []

    def denoise(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteLatents(3)
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(zimage.pipeline, "denoise", denoise)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    result = generate(tiny, "--prompts-file", str(prompts), "--batch-size", "1", "-o", str(out / "img.png"))
    assert result.exit_code == 1
    summary, listed, error = result.stderr.strip().splitlines()
    assert summary == "stopped: 1 of 3 image(s) written" and listed.strip() == str(out / "img-0000.png")
    assert error.startswith("error: ") and "NaN or Inf at step 4" in error and "--dtype" in error
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["img-0000.png"]
    assert_valid_image(out / "img-0000.png")


def test_non_finite_decoded_image_is_not_written_black(model, out):
    """NaN from the VAE would be written as an all-black picture; it stops the run instead."""
    def poison(state):
        state["decoder.conv_out.bias"][:] = float("nan")

    edit_tensors(model / VAE, poison)
    result = generate(model, "-p", "a cat", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, "NaN or Inf", "no image was written")
    assert not out.exists()


# ----------------------------------------------------------------------------- existing files and atomic writes

def test_existing_file_stops_a_single_run_before_any_work(tiny, out, loads):
    out.mkdir()
    target = out / "a.png"
    target.write_bytes(b"precious")
    result = generate(tiny, "-p", "a cat", "-o", str(target))
    assert_one_line_error(result, 2, str(target), "exists", "--overwrite")
    assert target.read_bytes() == b"precious"
    assert sorted(out.iterdir()) == [target] and loads == []


def test_overwrite_replaces_an_existing_file(tiny, out):
    out.mkdir()
    target = out / "a.png"
    target.write_bytes(b"old")
    result = generate(tiny, "-p", "a cat", "--overwrite", "-o", str(target))
    assert result.exit_code == 0, result.stderr
    assert_valid_image(target)
    assert sorted(out.iterdir()) == [target]


def test_existing_file_in_a_batch_is_skipped_and_the_others_written(tiny, tmp_path, out):
    out.mkdir()
    kept = out / "img-0001.png"
    kept.write_bytes(b"precious")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "img.png"))
    assert result.exit_code == 1, result.stderr
    assert f"skipped: prompts.txt line 2: {kept} exists (use --overwrite to replace it)" in result.stderr
    assert "Traceback" not in result.output
    assert kept.read_bytes() == b"precious"
    for name in ("img-0000.png", "img-0002.png"):
        assert_valid_image(out / name)
    assert sorted(p.name for p in out.iterdir()) == ["img-0000.png", "img-0001.png", "img-0002.png"]


def test_batch_whose_files_all_exist_writes_nothing(tiny, tmp_path, out):
    out.mkdir()
    for i in range(2):
        (out / f"img-{i:04d}.png").write_bytes(b"precious %d" % i)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    before = snapshot(out)
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "img.png"))
    assert result.exit_code == 1
    assert result.stderr.count("exists (use --overwrite to replace it)") == 2
    assert "nothing to generate" in result.stderr
    assert snapshot(out) == before


def test_batch_with_overwrite_replaces_existing_files(tiny, tmp_path, out):
    out.mkdir()
    (out / "img-0000.png").write_bytes(b"old")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    result = generate(tiny, "--prompts-file", str(prompts), "--overwrite", "-o", str(out / "img.png"))
    assert result.exit_code == 0, result.stderr
    for name in ("img-0000.png", "img-0001.png"):
        assert_valid_image(out / name)


def test_file_that_appears_during_the_run_is_not_overwritten(tiny, out, monkeypatch):
    """Another program creates the output file after planning, while the image is being made: it is kept."""
    target = out / "a.png"
    real_to_pil = zimage.pipeline.to_pil

    def to_pil(images):
        out.mkdir(exist_ok=True)
        target.write_bytes(b"written by someone else")
        return real_to_pil(images)

    monkeypatch.setattr(zimage.pipeline, "to_pil", to_pil)
    result = generate(tiny, "-p", "a cat", "-o", str(target))
    assert result.exit_code == 1
    assert f"could not write {target}: {target} exists (use --overwrite to replace it)" in result.stderr
    assert "Traceback" not in result.output
    assert target.read_bytes() == b"written by someone else"
    assert sorted(out.iterdir()) == [target]


def test_images_are_renamed_into_place_from_a_complete_temporary_file(tiny, tmp_path, out, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    real_replace = os.replace
    seen: list[tuple[Path, Path, bool]] = []

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        with Image.open(src) as im:  # the temporary file is a whole picture before it gets the final name
            im.verify()
        seen.append((src, dst, dst.exists()))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "img.png"))
    assert result.exit_code == 0, result.stderr
    assert [dst.name for _, dst, _ in seen] == ["img-0000.png", "img-0001.png"]
    for src, dst, existed in seen:
        assert src.parent == dst.parent  # same folder, so the rename is atomic
        assert re.fullmatch(rf"\.{re.escape(dst.name)}\..+\.part", src.name), src.name
        assert not existed
        assert not src.exists()
    assert part_files(out) == []


def test_failed_write_keeps_the_existing_file_and_leaves_no_temporary(tiny, out, monkeypatch):
    out.mkdir()
    target = out / "a.png"
    target.write_bytes(b"precious")

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    result = generate(tiny, "-p", "a cat", "--overwrite", "-o", str(target))
    assert result.exit_code == 1
    assert f"could not write {target}: No space left on device" in result.stderr
    assert "Traceback" not in result.output
    assert target.read_bytes() == b"precious"
    assert sorted(out.iterdir()) == [target]


# ---------------------------------------------------------------------------------------------------- Ctrl-C

def test_interrupt_while_writing_leaves_no_partial_file(tiny, tmp_path, out, monkeypatch):
    """Ctrl-C arriving in the middle of writing the second image: the first stays, the second leaves no trace."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            fp.write(b"\x89PNG\r\n\x1a\n half an image")
            fp.flush()
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result = generate(tiny, "--prompts-file", str(prompts), "--batch-size", "1", "-o", str(out / "img.png"))
    assert result.exit_code == 130, result.stderr
    assert "interrupted: 1 of 3 image(s) written" in result.stderr
    assert str(out / "img-0000.png") in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["img-0000.png"]  # no .part file, no half-written img-0001
    assert_valid_image(out / "img-0000.png")


@pytest.fixture
def sigint_default():
    """Ctrl-C as a terminal delivers it: a shell starts background jobs with SIGINT ignored, and Python then never
    installs its handler, so the tests would inherit whatever ran them."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # for children: Python then installs its own
    signal.signal(signal.SIGINT, before)


def test_interrupt_right_after_a_rename_still_reports_that_file(tiny, tmp_path, out, monkeypatch, sigint_default):
    # Ctrl-C landing between the rename and the bookkeeping must not leave an image on disk that the summary omits
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(zimage.images.os, "replace", replace)
    result = generate(tiny, "--prompts-file", str(prompts), "--batch-size", "1", "-o", str(out / "img.png"))
    assert result.exit_code == 130, result.stderr
    assert "interrupted: 2 of 3 image(s) written" in result.stderr
    for name in ("img-0000.png", "img-0001.png"):
        assert str(out / name) in result.stderr
        assert_valid_image(out / name)
    assert sorted(p.name for p in out.iterdir()) == ["img-0000.png", "img-0001.png"]


def run_zimage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(ZIMAGE), *args], capture_output=True, text=True, timeout=timeout)


def test_sigint_keeps_finished_images_and_says_what_was_written(tiny, tmp_path, out, sigint_default):
    n = 300  # far more than can finish between the first image and the signal, even on a fast machine
    prompts = tmp_path / "prompts.txt"
    # 10 prompts x 30 images: prompts are encoded one at a time before the first image, so not 300 of them
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(10)))
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen([str(ZIMAGE), "generate", "--model-path", str(tiny), "--prompts-file", str(prompts),
                                 "--num-images", str(n // 10), "--batch-size", "1", "--width", "64", "--height", "64", "--num-steps", "4",
                                 "--seed", "1", "-q", "-o", str(out / "img.png")], stdout=so, stderr=se,
                                preexec_fn=sigint_default)
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob("img-*.png")):
                assert proc.poll() is None, f"exited {proc.returncode} before any image: {stderr.read_text()}"
                assert time.monotonic() < deadline, "no image after 120 s"
                time.sleep(0.01)
            time.sleep(0.05)  # land somewhere inside a later image, not right at the first rename
            assert proc.poll() is None, "the run finished before it could be interrupted"
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr.read_text()
    assert code == 130, err
    assert "Traceback" not in err
    written = sorted(out.glob("img-*.png"))
    assert 1 <= len(written) < n
    assert re.search(rf"^interrupted: {len(written)} of {n} image\(s\) written$", err, re.M), err
    for path in written:
        assert str(path) in err
        assert_valid_image(path)
    assert part_files(out) == []
    assert sorted(out.iterdir()) == written
    assert stdout.read_text() == ""


# ---------------------------------------------------------------------------- the real command, end to end

def test_command_usage_error_is_one_line_with_exit_code_2(tiny, tmp_path):
    result = run_zimage("generate", "--model-path", str(tiny), "-p", "a cat", "--width", "1920", "--height", "1080",
                        "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("error: 1920x1080: width and height must be multiples of 16. "
                             "Try 1920x1072 or 1920x1088\n")
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_command_missing_model_is_one_line_with_exit_code_2(tmp_path):
    result = run_zimage("generate", "--model-path", str(tmp_path / "weights"), "-p", "a cat", "--seed", "1",
                        "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(tmp_path / "weights") in result.stderr and DOWNLOAD_HINT not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_command_damaged_weights_exit_1_and_debug_shows_the_traceback(model, out):
    truncate(model / TRANSFORMER, 0.5)
    args = ["generate", "--model-path", str(model), "-p", "a cat", *SMALL, "-o", str(out / "a.png")]
    plain = run_zimage(*args)
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert str(model / TRANSFORMER) in plain.stderr
    debug = run_zimage(*args, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "WeightsError" in debug.stderr and str(model / TRANSFORMER) in debug.stderr
    assert not out.exists()


def test_out_of_memory_names_the_size_tried_and_what_lowers_memory(tiny, out, monkeypatch):
    def denoise(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(zimage.pipeline, "denoise", denoise)
    result = generate(tiny, "-p", "a cat", "--width", "96", "--height", "64", "-o", str(out / "a.png"))
    assert_one_line_error(result, 1, "out of cpu memory while making 1 image(s) of 96x64", "--offload sequential",
                          "--vae-tiling")
    assert not (out / "a.png").exists()
