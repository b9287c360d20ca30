"""Picture inputs from the command line: odd files that must work, bad input that must fail with one line before
any weights are read, and --from-png with the recorded inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetModel
from PIL import Image
from typer.testing import CliRunner

import zimage.controlnet
import zimage.pipeline
import zimage.text_encoder
import zimage.weights
from zimage.cli import app
from zimage.inputs import load_rgb

SMALL = ["--num-steps", "2", "--seed", "7", "-q"]


def generate(model: Path, *args: str):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), "--prompt", "a cat", *SMALL, *args])


def assert_one_line_error(result, code: int, *phrases: str) -> str:
    assert result.exit_code == code, f"exit {result.exit_code}, stderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}



def gradient(w=64, h=48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


@pytest.fixture
def pics(tmp_path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(gradient()).save(folder / "rgb.png")
    Image.fromarray(gradient(32, 32)).save(folder / "square.png")
    (folder / "notes.png").write_text("not a picture")
    Image.fromarray(gradient()[:, :, 0]).save(folder / "mask.png")
    return folder


def controlnet(folder: Path, dim: int, heads: int) -> Path:
    ZImageControlNetModel(control_layers_places=[0], control_in_dim=16, dim=dim, n_refiner_layers=1, n_heads=heads,
                          n_kv_heads=heads).save_pretrained(str(folder))
    return folder


BAD = {  # name: (arguments, exit code, phrases of the error line); {p} is the pictures folder
    "missing init image": (["--init-image", "{p}/nope.png"], 2, ["--init-image", "nope.png", "not found"]),
    "init image not a picture": (["--init-image", "{p}/notes.png"], 2, ["notes.png", "not an image"]),
    "init image a folder": (["--init-image", "{p}"], 2, ["not a file"]),
    "mask aspect differs": (["--init-image", "{p}/rgb.png", "--mask", "{p}/square.png"], 2,
                            ["--mask", "32x32", "aspect ratio", "64x48"]),
    "strength zero": (["--init-image", "{p}/rgb.png", "--strength", "0"], 2, ["--strength must be in (0, 1]"]),
    "strength above one": (["--init-image", "{p}/rgb.png", "--strength", "1.5"], 2, ["(got 1.5)"]),
    "mask without init image": (["--mask", "{p}/mask.png"], 2, ["--mask needs --init-image"]),
    "strength without init image": (["--strength", "0.5"], 2, ["--strength needs --init-image"]),
    "control image without controlnet": (["--control-image", "{p}/rgb.png"], 2, ["needs --controlnet"]),
    "control image not a picture": (["--control-image", "{p}/notes.png", "--controlnet", "{p}/cn"], 2,
                                    ["--control-image", "not an image"]),
    "controlnet for another model": (["--control-image", "{p}/rgb.png", "--controlnet", "{p}/other"], 2,
                                     ["is for another model", "dim 96"]),
    "controlnet file not a controlnet": (["--control-image", "{p}/rgb.png", "--controlnet", "{m}/vae/"
                                          "diffusion_pytorch_model.safetensors"], 2, ["not a Z-Image ControlNet"]),
    "controlnet missing": (["--control-image", "{p}/rgb.png", "--controlnet", "{p}/none.safetensors"], 2,
                           ["not found"]),
    "1.0 controlnet for inpainting": (["--control-image", "{p}/rgb.png", "--controlnet", "{p}/cn", "--init-image",
                                       "{p}/rgb.png", "--mask", "{p}/mask.png"], 2, ["needs a 2.x one"]),
    "controlnet image-to-image": (["--control-image", "{p}/rgb.png", "--controlnet", "{p}/cn", "--init-image",
                                   "{p}/rgb.png"], 2, ["needs --mask"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_picture_input_fails_with_one_line_before_loading(tiny, pics, tmp_path, loads, name):
    controlnet(pics / "cn", 64, 2)
    controlnet(pics / "other", 96, 2)
    args, code, phrases = BAD[name]
    args = [a.format(p=pics, m=tiny) for a in args]
    before = snapshot(tmp_path)
    result = generate(tiny, *args, "-o", str(tmp_path / "out.png"))
    assert_one_line_error(result, code, *phrases)
    assert snapshot(tmp_path) == before and loads == []


def odd_files(folder: Path) -> dict[str, Path]:
    """The same 64x48 picture as an animated GIF (first frame), a 16-bit grey PNG, a CMYK JPEG and a palette PNG
    with transparency."""
    rgb = gradient()
    frames = [Image.fromarray(rgb).convert("P"), Image.fromarray(255 - rgb).convert("P")]
    files = {k: folder / n for k, n in (("gif", "anim.gif"), ("i16", "deep.png"), ("cmyk", "print.jpg"),
                                         ("palette", "pal.png"))}
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(files["i16"])
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], quality=95)
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(files["palette"], transparency=0)
    return files


def test_odd_picture_files_are_read_as_rgb(tmp_path):
    files = odd_files(tmp_path)
    rgb = gradient().astype(int)
    for kind, path in files.items():
        got = np.asarray(load_rgb(path, "--init-image")).astype(int)
        assert got.shape == (48, 64, 3), kind
        quantized = np.asarray(Image.fromarray(gradient()).convert("P").convert("RGB")).astype(int)
        want = {"i16": np.repeat(rgb[:, :, :1], 3, -1), "gif": quantized, "palette": quantized}.get(kind, rgb)
        # the GIF's first frame and the palette's colours exactly; 16 bits scaled (not clipped to white); CMYK close
        assert np.abs(got - want).mean() < (0.01 if kind in ("gif", "palette") else 3), kind


@pytest.mark.parametrize("kind", ["gif", "i16", "cmyk", "palette"])
def test_odd_picture_files_work_as_init_image_mask_and_control(tiny, tmp_path, kind):
    path = odd_files(tmp_path)[kind]
    out = tmp_path / "out.png"
    result = generate(tiny, "--init-image", str(path), "--mask", str(path), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert Image.open(out).size == (64, 48)


def test_from_png_reruns_with_the_recorded_pictures_and_refuses_changed_ones(tiny, pics, tmp_path):
    first = tmp_path / "first.png"
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompt", "a cat", "--num-steps", "2",
                                      "--seed", "7", "--init-image", str(pics / "rgb.png"), "--mask",
                                      str(pics / "mask.png"), "--strength", "0.5", "-o", str(first)])
    assert result.exit_code == 0, result.stderr
    assert "Saved" in result.stderr and "1 of 2 steps" in result.stderr
    meta = json.loads(Image.open(first).info["zimage"])
    assert meta["init_image_sha256"] == hashlib.sha256((pics / "rgb.png").read_bytes()).hexdigest()
    again = tmp_path / "again.png"
    result = CliRunner().invoke(app, ["generate", "--from-png", str(first), "-q", "-o", str(again)])
    assert result.exit_code == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))

    Image.fromarray(255 - gradient()).save(pics / "rgb.png")  # same name, other picture
    result = CliRunner().invoke(app, ["generate", "--from-png", str(first), "-q", "-o", str(tmp_path / "x.png")])
    assert_one_line_error(result, 2, "--init-image", "has changed")
    (pics / "mask.png").unlink()
    result = CliRunner().invoke(app, ["generate", "--from-png", str(first), "--init-image", str(pics / "rgb.png"),
                                      "-q", "-o", str(tmp_path / "x.png")])
    assert_one_line_error(result, 2, "--mask", "not there any more")
    assert not (tmp_path / "x.png").exists()


def test_jsonl_picture_paths_are_relative_to_the_file(tiny, pics, tmp_path):
    jsonl = pics / "jobs.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a dog", "init_image": "rgb.png", "strength": 1.0}) + "\n" +
                     json.dumps({"prompt": "a cow", "init_image": "gone.png"}) + "\n")
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompts-file", str(jsonl), *SMALL,
                                      "-o", str(tmp_path / "j.png")])
    assert result.exit_code == 1  # the second item is skipped, the first one written
    assert "gone.png not found" in result.stderr
    assert json.loads(Image.open(tmp_path / "j-0000.png").info["zimage"])["init_image"] == str(pics / "rgb.png")
