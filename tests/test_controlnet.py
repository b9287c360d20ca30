"""ControlNet against diffusers 0.42's ZImageControlNetPipeline / ZImageControlNetInpaintPipeline, with tiny random
ZImageControlNetModel checkpoints written by diffusers' own save_pretrained (folder) or as one file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline,
                       ZImagePipeline)
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from zimage.cli import app

PROMPT, SEED = "a dancer on a stage", 99
VARIANTS = {"1.0": (None, 16), "2.0": ("control_layers", 33), "2.1": ("control_noise_refiner", 33)}


def make_controlnet(folder, variant: str, seed: int = 0) -> ZImageControlNetModel:
    """A tiny ControlNet for the default tiny checkpoint (dim 64, 2 layers, 1 refiner, 2 heads), with random
    weights everywhere (diffusers starts its projections at zero, which would hide every mistake)."""
    kind, in_dim = VARIANTS[variant]
    torch.manual_seed(seed)
    model = ZImageControlNetModel(control_layers_places=[0, 1], control_refiner_layers_places=[0],
                                  control_in_dim=in_dim, add_control_noise_refiner=kind, dim=64, n_refiner_layers=1,
                                  n_heads=2, n_kv_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def base(tiny):
    pipe = ZImagePipeline.from_pretrained(str(tiny), dtype=torch.float32)
    return pipe.components


def picture(w, h, seed) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h // 8, w // 8, 3) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def generate(model, *args):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), "--prompt", PROMPT, "--seed", str(SEED),
                                    "-q", "--dtype", "float32", *args])


@pytest.mark.parametrize("variant,scale,guidance", [("1.0", None, 0.0), ("1.0", 1.4, 2.0), ("2.0", 0.5, 0.0),
                                                    ("2.1", 1.0, 0.0)])
def test_controlnet_png_matches_reference(tiny, base, tmp_path, variant, scale, guidance):
    cn = make_controlnet(tmp_path / "cn", variant)
    control, out = tmp_path / "pose.png", tmp_path / "out.png"
    picture(100, 66, seed=4).save(control)  # not multiples of 16: the output is 96x64, as the reference's
    result = generate(tiny, "--control-image", str(control), "--controlnet", str(tmp_path / "cn"), "--guidance-scale",
                      str(guidance), "-o", str(out), *(["--control-scale", str(scale)] if scale else []))
    assert result.exit_code == 0, result.output
    pipe = ZImageControlNetPipeline(**base, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    # the reference's default size is 1024x1024; zimage's is the control image's, rounded down as img2img's
    expected = pipe(PROMPT, control_image=Image.open(control).convert("RGB"), width=96, height=64,
                    num_inference_steps=8, guidance_scale=guidance, controlnet_conditioning_scale=scale or 0.75,
                    generator=torch.Generator().manual_seed(SEED)).images[0]
    ours = pixels(out)
    assert ours.shape == (64, 96, 3)
    assert np.abs(ours - np.asarray(expected).astype(int)).max() <= 2
    meta = json.loads(Image.open(out).info["zimage"])
    assert meta["control_scale"] == (scale or 0.75) and len(meta["control_image_sha256"]) == 64


def test_control_scale_changes_the_picture(tiny, tmp_path):
    make_controlnet(tmp_path / "cn", "1.0")
    picture(64, 64, seed=5).save(tmp_path / "c.png")
    for scale in ("0.0", "1.0"):
        result = generate(tiny, "--control-image", str(tmp_path / "c.png"), "--controlnet", str(tmp_path / "cn"),
                          "--control-scale", scale, "-o", str(tmp_path / f"{scale}.png"))
        assert result.exit_code == 0, result.output
    plain = generate(tiny, "--width", "64", "--height", "64", "-o", str(tmp_path / "plain.png"))
    assert plain.exit_code == 0, plain.output
    assert np.abs(pixels(tmp_path / "0.0.png") - pixels(tmp_path / "plain.png")).max() <= 2
    assert np.abs(pixels(tmp_path / "1.0.png") - pixels(tmp_path / "plain.png")).max() > 10


def test_single_file_controlnet_loads_like_the_folder(tiny, tmp_path):
    cn = make_controlnet(tmp_path / "cn", "1.0")
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(tmp_path / "union.safetensors"))
    picture(64, 48, seed=6).save(tmp_path / "c.png")
    for name, path in (("folder", tmp_path / "cn"), ("file", tmp_path / "union.safetensors")):
        result = generate(tiny, "--control-image", str(tmp_path / "c.png"), "--controlnet", str(path),
                          "-o", str(tmp_path / f"{name}.png"))
        assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "file.png"))


def test_controlnet_inpainting_matches_reference(tiny, base, tmp_path):
    cn = make_controlnet(tmp_path / "cn", "2.1", seed=3)
    control, image, mask, out = (tmp_path / n for n in ("c.png", "i.png", "m.png", "out.png"))
    picture(96, 64, seed=7).save(control)
    picture(96, 64, seed=8).save(image)
    m = np.zeros((64, 96), np.uint8)
    m[8:40, 30:80] = 255
    Image.fromarray(m).save(mask)
    result = generate(tiny, "--control-image", str(control), "--controlnet", str(tmp_path / "cn"), "--init-image",
                      str(image), "--mask", str(mask), "--control-scale", "0.9", "-o", str(out))
    assert result.exit_code == 0, result.output
    pipe = ZImageControlNetInpaintPipeline(**base, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, image=Image.open(image).convert("RGB"), mask_image=Image.open(mask).convert("RGB"),
                    control_image=Image.open(control).convert("RGB"), width=96, height=64, num_inference_steps=8,
                    guidance_scale=0.0,
                    controlnet_conditioning_scale=0.9, generator=torch.Generator().manual_seed(SEED)).images[0]
    assert np.abs(pixels(out) - np.asarray(expected).astype(int)).max() <= 2


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_controlnet_with_offload_gives_the_same_picture(tiny, tmp_path, offload):
    make_controlnet(tmp_path / "cn", "2.1")
    picture(64, 48, seed=9).save(tmp_path / "c.png")
    for mode in ("none", offload):
        result = generate(tiny, "--control-image", str(tmp_path / "c.png"), "--controlnet", str(tmp_path / "cn"),
                          "--offload", mode, "-o", str(tmp_path / f"{mode}.png"))
        assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "none.png"), pixels(tmp_path / f"{offload}.png"))
