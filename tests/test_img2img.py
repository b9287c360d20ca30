"""Starting from a picture: image-to-image and inpainting against diffusers 0.42's ZImageImg2ImgPipeline and
ZImageInpaintPipeline on tiny checkpoints, through the real command; odd picture files; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
from PIL import Image
from typer.testing import CliRunner

from zimage.cli import app

PROMPT, SEED = "a watercolor of a harbour", 321


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture (VAE-friendly) of w x h."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(max(h // 8, 2), max(w // 8, 2), 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def ref_img2img(checkpoints):
    pipes = {n: ZImageImg2ImgPipeline.from_pretrained(str(checkpoints[n]), dtype=torch.float32)
             for n in ("single", "sharded")}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def ref_inpaint(tiny):
    pipe = ZImageInpaintPipeline.from_pretrained(str(tiny), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(model, *args):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), "--prompt", PROMPT, "--seed", str(SEED),
                                    "-q", "--dtype", "float32", *args])


CASES = {  # name: (checkpoint, picture size, strength, guidance, steps)
    "s0.3-nonsquare": ("single", (100, 70), 0.3, 0.0, 8),
    "s0.6-default-strength": ("single", (64, 96), None, 0.0, 8),
    "s1.0-cfg": ("single", (80, 48), 1.0, 3.0, 8),
    "s0.6-cfg-dynamic-shift": ("sharded", (96, 64), 0.6, 4.0, 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_img2img_png_matches_reference(checkpoints, ref_img2img, tmp_path, case):
    name, size, strength, guidance, steps = CASES[case]
    src = tmp_path / "in.png"
    picture(*size, seed=1).save(src)
    out = tmp_path / "out.png"
    args = ["--init-image", str(src), "--guidance-scale", str(guidance), "--num-steps", str(steps), "-o", str(out)]
    result = generate(checkpoints[name], *args, *(["--strength", str(strength)] if strength else []))
    assert result.exit_code == 0, result.output
    expected = ref_img2img[name](PROMPT, image=Image.open(src).convert("RGB"), strength=strength or 0.6,
                                 num_inference_steps=steps, guidance_scale=guidance,
                                 generator=torch.Generator().manual_seed(SEED)).images[0]
    ours = pixels(out)
    assert ours.shape == (size[1] // 16 * 16, size[0] // 16 * 16, 3)
    assert np.abs(ours - np.asarray(expected).astype(int)).max() <= 2
    meta = json.loads(Image.open(out).info["zimage"])
    assert meta["strength"] == (strength or 0.6) and meta["init_image"] == str(src.resolve())


def test_img2img_resizes_the_picture_to_the_given_size(tiny, ref_img2img, tmp_path):
    src = tmp_path / "in.png"
    picture(90, 60, seed=2).save(src)
    out = tmp_path / "out.png"
    result = generate(tiny, "--init-image", str(src), "--width", "64", "--height", "48", "-o", str(out))
    assert result.exit_code == 0, result.output
    pipe = ref_img2img["single"]
    resized = pipe.image_processor.resize(Image.open(src).convert("RGB"), 48, 64)  # what preprocess(h, w) does
    expected = pipe(PROMPT, image=resized, strength=0.6, num_inference_steps=8, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(SEED)).images[0]
    assert np.abs(pixels(out) - np.asarray(expected).astype(int)).max() <= 2


def test_batch_of_two_init_images_matches_reference_batch(tiny, ref_img2img, tmp_path):
    (tmp_path / "pics").mkdir()
    for k in range(2):
        picture(64, 80, seed=10 + k).save(tmp_path / "pics" / f"p{k}.png")
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "init_image": f"pics/p{k}.png", "strength": 0.7}) + "\n"
                             for k, p in enumerate(["a cat", "a boat"])))
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompts-file", str(jsonl), "--seed",
                                      "5", "--batch-size", "2", "-o", str(tmp_path / "b.png"), "-q",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    images = [Image.open(tmp_path / "pics" / f"p{k}.png").convert("RGB") for k in range(2)]
    expected = ref_img2img["single"](["a cat", "a boat"], image=images, strength=0.7, num_inference_steps=8,
                                     guidance_scale=0.0,
                                     generator=[torch.Generator().manual_seed(5 + k) for k in range(2)]).images
    for k in range(2):
        assert np.abs(pixels(tmp_path / f"b-{k:04d}.png") - np.asarray(expected[k]).astype(int)).max() <= 2


def rect_mask(w, h) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2 + 8, w // 3 : w - 8] = 255
    return Image.fromarray(m)


def soft_mask(w, h) -> Image.Image:
    """A grey radial gradient in RGB: the reference binarizes it at 50% after resizing and greying."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((x - w / 2) / w, (y - h / 2) / h)
    g = (np.clip(1 - 2 * r, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([g, g // 2 + 60, g], -1))


@pytest.mark.parametrize("mask_kind,strength,guidance", [("rect", None, 0.0), ("soft", 0.8, 2.0)])
def test_inpainting_png_matches_reference(tiny, ref_inpaint, tmp_path, mask_kind, strength, guidance):
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    picture(96, 64, seed=3).save(src)
    (rect_mask if mask_kind == "rect" else soft_mask)(48, 32).save(mask)  # half size: resized like the reference
    result = generate(tiny, "--init-image", str(src), "--mask", str(mask), "--guidance-scale", str(guidance),
                      "-o", str(out), *(["--strength", str(strength)] if strength else []))
    assert result.exit_code == 0, result.output
    expected = ref_inpaint(PROMPT, image=Image.open(src).convert("RGB"), mask_image=Image.open(mask).convert("RGB"),
                           strength=strength or 1.0, num_inference_steps=8, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(SEED)).images[0]
    ours = pixels(out)
    assert np.abs(ours - np.asarray(expected).astype(int)).max() <= 2
    meta = json.loads(Image.open(out).info["zimage"])
    assert meta["mask"] == str(mask.resolve()) and len(meta["mask_sha256"]) == 64
