"""Decoded tensors to picture files: conversion, settings metadata, and atomic writes.

numpy, PIL and torch are imported where used: planning a run (jobs.py) needs only FORMATS."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NonFiniteImage

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_USER_COMMENT = 0x9286


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float images in [-1, 1] to 8-bit RGB pictures, rounding as the reference does.
    Raises NonFiniteImage rather than turn NaN or Inf into black pixels."""
    if not bool(images.isfinite().all()):
        raise NonFiniteImage("the decoded image holds NaN or Inf values (the VAE overflowed, or its weights do); "
                             "no image was written for this batch. Try --dtype float32, or download the VAE again")
    import numpy as np
    from PIL import Image

    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


def parameters_text(meta: dict) -> str:
    """Settings in the plain form other image tools read: prompt, negative prompt, then one line of settings."""
    settings = (f"Steps: {meta['steps']}, Sampler: FlowMatch Euler, CFG scale: {meta['guidance']}, "
                f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['model']}")
    return f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\n{settings}"


def save_image(image: Image.Image, path: Path, meta: dict, overwrite: bool) -> None:
    """Write `image` with its settings to `path` atomically: a temporary file in the same folder, then a rename.

    PNG gets `parameters` and `zimage` (JSON) text chunks; JPEG and WebP carry the JSON as an EXIF user comment.
    Refuses to replace an existing file unless `overwrite`.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image, PngImagePlugin

    fmt = FORMATS[path.suffix.lower()]
    kwargs: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters_text(meta))
        info.add_text("zimage", json.dumps(meta, ensure_ascii=False))
        kwargs["pnginfo"] = info
    else:
        exif = Image.Exif()
        exif[EXIF_USER_COMMENT] = json.dumps(meta, ensure_ascii=False)
        kwargs.update(exif=exif, quality=95)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; images should get the usual permissions
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_settings(path: Path) -> dict:
    """The `zimage` settings stored in a picture written by this tool."""
    from PIL import Image

    with Image.open(path) as im:
        raw = im.info.get("zimage") if im.format == "PNG" else im.getexif().get(EXIF_USER_COMMENT)
    if not raw:
        raise ValueError(f"{path} carries no zimage settings (was it written by zimage?)")
    return json.loads(raw)
