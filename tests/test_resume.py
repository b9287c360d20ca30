"""Resuming a batch with --skip-existing: finished images are kept without loading anything, images made with
other settings are never silently replaced, and a run killed with SIGKILL at any point and run again ends with
exactly the files of an uninterrupted run, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import zimage.pipeline
import zimage.text_encoder
import zimage.weights
from zimage.cli import app

ZIMAGE = Path(sys.executable).parent / "zimage"
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "7"]
PROMPTS = ["a red car", "a blue boat", "a green tree", "a yellow sun", "a white cloud"]


def generate(model: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), *SMALL, *args], input=input)


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]



SOURCES = ["prompt", "file", "stdin"]


def source_args(source: str, tmp_path: Path) -> tuple[list[str], str | None]:
    """The same two images asked for with --prompt, a prompts file, or stdin."""
    if source == "prompt":
        return ["-p", PROMPTS[0], "-p", PROMPTS[1]], None
    if source == "file":
        path = tmp_path / "prompts.txt"
        path.write_text("\n".join(PROMPTS[:2]) + "\n")
        return ["--prompts-file", str(path)], None
    return ["--prompts-file", "-"], "\n".join(PROMPTS[:2]) + "\n"


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> Path:
    """Two images made once: the finished run the tests below resume."""
    out = tmp_path_factory.mktemp("made")
    result = generate(tiny, "-p", PROMPTS[0], "-p", PROMPTS[1], "-o", str(out / "{index}.png"))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def out(made, tmp_path) -> Path:
    copy = tmp_path / "out"
    copy.mkdir()
    for p in made.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


@pytest.mark.parametrize("source", SOURCES)
def test_finished_run_is_skipped_without_loading_a_model(tiny, out, tmp_path, loads, source):
    args, stdin = source_args(source, tmp_path)
    before = files(out)
    result = generate(tiny, *args, "--skip-existing", "--json", "-o", str(out / "{index}.png"), input=stdin)
    assert result.exit_code == 0, result.stderr
    assert loads == []
    assert [(r["path"], r["skipped"]) for r in records(result)] == [(str(out / "0.png"), True),
                                                                       (str(out / "1.png"), True)]
    assert "0 image(s) written, 2 skipped, 0 failed" in result.stderr
    assert files(out) == before


def test_the_same_checkpoint_spelled_otherwise_is_the_same_setting(tiny, out, loads, monkeypatch):
    monkeypatch.chdir(tiny.parent)  # the run being resumed named it by its absolute path
    result = CliRunner().invoke(app, ["generate", "--model-path", tiny.name, *SMALL, "-p", PROMPTS[0], "-p", PROMPTS[1],
                                      "--skip-existing", "-o", str(out / "{index}.png")])
    assert result.exit_code == 0, result.stderr
    assert "0 image(s) written, 2 skipped" in result.stderr and loads == []


@pytest.mark.parametrize("source", SOURCES)
def test_image_made_with_other_settings_is_a_usage_error_naming_it(tiny, out, tmp_path, loads, source):
    args, stdin = source_args(source, tmp_path)
    before = files(out)
    result = generate(tiny, *args, "--skip-existing", "--num-steps", "3", "-o", str(out / "{index}.png"),
                      input=stdin)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(out / "0.png") in lines[0] and "steps 2 there, 3 now" in lines[0] and "--overwrite" in lines[0]
    assert files(out) == before and loads == []


def test_overwrite_with_skip_existing_replaces_only_what_differs(tiny, out):
    (out / "1.png").unlink()
    first = files(out)
    result = generate(tiny, "-p", PROMPTS[0], "-p", "another prompt", "--skip-existing", "--overwrite", "--json",
                      "-o", str(out / "{index}.png"))
    assert result.exit_code == 0, result.stderr
    assert [r.get("skipped", False) for r in records(result)] == [True, False]
    assert files(out)["0.png"] == first["0.png"]
    assert json.loads(Image.open(out / "1.png").info["zimage"])["prompt"] == "another prompt"


def test_a_file_without_zimage_settings_is_not_replaced(tiny, out, loads):
    (out / "1.png").write_bytes(b"someone else's picture")
    result = generate(tiny, "-p", PROMPTS[0], "-p", PROMPTS[1], "--skip-existing", "-o", str(out / "{index}.png"))
    assert result.exit_code == 2
    assert str(out / "1.png") in result.stderr and "no zimage settings" in result.stderr
    assert (out / "1.png").read_bytes() == b"someone else's picture"


def test_cut_off_image_and_stale_part_files_are_made_again(tiny, made, out):
    whole = (out / "1.png").read_bytes()
    (out / "1.png").write_bytes(whole[: len(whole) // 2])  # its settings chunk survives, its pixels do not
    (out / ".1.png.x8k2.part").write_bytes(whole[:100])  # left by a write that was killed
    result = generate(tiny, "-p", PROMPTS[0], "-p", PROMPTS[1], "--skip-existing", "--json",
                      "-o", str(out / "{index}.png"))
    assert result.exit_code == 0, result.stderr
    assert [r.get("skipped", False) for r in records(result)] == [True, False]
    assert files(out) == files(made)


def test_half_made_batch_is_made_whole_so_every_image_is_the_same(tiny, tmp_path):
    """With --batch-size 2 the missing image is made in the batch it was first planned in."""
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    args = [a for p in PROMPTS[:4] for a in ("-p", p)] + ["--batch-size", "2", "--negative-prompt", "ugly"]
    assert generate(tiny, *args, "-o", str(clean / "{index}.png")).exit_code == 0
    resumed.mkdir()
    for name in ("0.png", "1.png", "2.png"):
        (resumed / name).write_bytes((clean / name).read_bytes())
    before = (resumed / "2.png").stat().st_mtime_ns
    result = generate(tiny, *args, "--skip-existing", "--json", "-o", str(resumed / "{index}.png"))
    assert result.exit_code == 0, result.stderr
    assert [r.get("skipped", False) for r in records(result)] == [True, True, True, False]
    assert files(resumed) == files(clean)
    assert (resumed / "2.png").stat().st_mtime_ns == before  # made again for its batch, not written again


def test_existing_files_without_skip_existing_count_as_failed(tiny, out, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "{index}.png"))
    assert result.exit_code == 1
    assert "1 image(s) written, 0 skipped, 2 failed" in result.stderr
    assert "--skip-existing" in result.stderr


def test_settings_compare_every_field_at_any_depth_but_file_locations():
    from zimage.resume import difference

    lora = {"name": "style.safetensors", "path": "/a/style.safetensors", "sha256": "ab", "scale": 0.8}
    meta = {"prompt": "p", "seed": 1, "model": "Z", "model_path": "/a/Z", "loras": [lora]}
    moved = {**meta, "model_path": "/b/Z", "loras": [{**lora, "path": "/b/style.safetensors"}]}
    assert difference(meta, moved) is None
    assert difference(meta, {**meta, "loras": [{**lora, "scale": 0.5}]}).startswith("loras ")
    assert difference(meta, {k: v for k, v in meta.items() if k != "loras"}).startswith("loras ")
    assert difference(meta, {**meta, "input_image": {"sha256": "cd"}}).startswith("input_image none there")


# ------------------------------------------------------------------------------- SIGKILL, then run again

def command(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [str(ZIMAGE), "generate", "--model-path", str(model), "--prompts-file", str(prompts), *SMALL,
            "-o", str(out / "{index}.png"), *extra]


@pytest.fixture(scope="module")
def clean_run(tiny, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("clean")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    subprocess.run(command(tiny, prompts, root / "out"), check=True, capture_output=True)
    return prompts, files(root / "out")


@pytest.mark.parametrize("after", [0, 1, 3], ids=lambda n: f"after-{n}-images")
def test_killed_run_finishes_byte_for_byte_when_run_again(tiny, tmp_path, clean_run, after):
    prompts, expected = clean_run
    out = tmp_path / "out"
    proc = subprocess.Popen(command(tiny, prompts, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(out.glob("*.png")) if out.exists() else []) < after:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(list(out.glob("*.png")) if out.exists() else []) < len(PROMPTS)  # killed before the end
    again = subprocess.run(command(tiny, prompts, out, "--skip-existing"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert files(out) == expected
