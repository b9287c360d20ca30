"""Pictures given as inputs (init image, mask, control image): reading any file PIL opens, and turning it into the
tensors the reference's image processor makes (diffusers' `load_image` + `VaeImageProcessor.preprocess`)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and PIL load only when a picture is read: planning a run and --help stay light
    import numpy as np
    from PIL import Image

log = logging.getLogger("zimage")

SIZE_MULTIPLE = 16  # the VAE's 8x reduction times the transformer's 2x2 patches
ROLES = {"init_image": "--init-image", "mask": "--mask", "control_image": "--control-image"}
INPUT_FIELDS = tuple(ROLES)  # picture files: relative to a JSONL file, hashed in the metadata


class InputImageError(ValueError):
    """An input picture is missing, unreadable, or does not fit the run."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) after EXIF rotation, read from the header only; raises InputImageError for a bad file."""
    with _open(path, what) as im:
        size = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _open(path: Path, what: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputImageError(f"{what} {path} not found" if not path.exists() else f"{what} {path} is not a file")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise InputImageError(f"{what} {path} is not an image PIL can read") from None
    except OSError as e:
        raise InputImageError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def _eight_bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit single-channel pictures scaled to 8 bits (PIL's convert would clip them to white)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a  # float pictures usually hold 0..1
    elif a.size and int(a.max()) > 255:
        a = a / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def load_rgb(path: Path, what: str) -> Image.Image:
    """The picture as 8-bit RGB, as diffusers' `load_image` gives it: EXIF rotation applied, first frame of an
    animation, alpha dropped, palette/CMYK/16-bit converted."""
    from PIL import ImageOps

    with _open(path, what) as im:
        try:
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                im = _eight_bit(im)
            return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged image data
            raise InputImageError(f"{what} {path} cannot be decoded: {e}") from None


def resized(im: Image.Image, width: int, height: int) -> Image.Image:
    """Resized with Lanczos as the reference's image processor does (a no-op at the same size)."""
    from PIL import Image

    return im if im.size == (width, height) else im.resize((width, height), resample=Image.LANCZOS)


def image_array(im: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1]: the reference's preprocess of an RGB picture."""
    import numpy as np

    a = np.asarray(resized(im, width, height)).astype(np.float32) / 255.0
    return (a.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_array(im: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint): resized, made grey, binarized at 0.5, as the
    reference's mask processor does (a soft mask becomes a hard one there too)."""
    import numpy as np

    a = np.asarray(resized(im, width, height).convert("L")).astype(np.float32) / 255.0
    return (a >= 0.5).astype(np.float32)[None, None]


def default_size(width: int, height: int) -> tuple[int, int]:
    """An input's size rounded down to multiples of 16, as the reference does when no size is given."""
    return width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE


def aspect_differs(a: tuple[int, int], b: tuple[int, int], tolerance: float = 0.01) -> bool:
    """Whether two (width, height) sizes differ in aspect ratio by more than `tolerance` (relative)."""
    return abs(a[0] * b[1] - a[1] * b[0]) > tolerance * a[0] * b[1]


DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}  # ZImageImg2ImgPipeline's and ZImageInpaintPipeline's defaults


def picture_defaults(merged: dict, fields: dict, size_given: tuple[bool, bool]) -> dict:
    """Settings completed from the input pictures: strength as the reference's pipeline for the mode has it, and
    the size of the init (or control) image rounded down to multiples of 16 where no size was given."""
    merged = dict(merged)
    if merged.get("init_image") and merged.get("strength") is None and not merged.get("control_image"):
        merged["strength"] = DEFAULT_STRENGTH["inpaint" if merged.get("mask") else "img2img"]
    role = "init_image" if merged.get("init_image") else "control_image"
    free = [not size_given[0] and "width" not in fields, not size_given[1] and "height" not in fields]
    if merged.get(role) and any(free):
        source = merged[role]
        w, h = image_size(Path(source), ROLES[role])
        rw, rh = default_size(w, h)
        if rw < SIZE_MULTIPLE or rh < SIZE_MULTIPLE:
            raise InputImageError(f"{ROLES[role]} {source} is {w}x{h}; each side must be at least 16 px")
        if (rw, rh) != (w, h):
            log.info("%s %s is %dx%d: making %dx%d (multiples of 16)", ROLES[role], source, w, h, rw, rh)
        merged.update({k: v for k, v, f in (("width", rw, free[0]), ("height", rh, free[1])) if f})
    return merged


def inputs_problem(s) -> str | None:
    """Why the picture inputs of Settings `s` cannot run, checked on the files' headers; None when they can."""
    if s.strength is not None and not s.init_image:
        return "--strength needs --init-image"
    if s.mask and not s.init_image:
        return "--mask needs --init-image (the picture to repaint)"
    if s.control_image and not s.controlnet:
        return "--control-image needs --controlnet PATH (a Z-Image ControlNet checkpoint)"
    if s.control_image and s.init_image and not s.mask:
        return ("--init-image with --control-image needs --mask: the reference has ControlNet inpainting but no "
                "ControlNet image-to-image")
    if s.control_image and s.strength is not None:
        return "--strength is not used with --control-image (ControlNet inpainting starts from noise)"
    if s.strength is not None and not 0 < s.strength <= 1:
        return f"--strength must be in (0, 1] (got {s.strength})"
    try:
        sizes = {role: image_size(Path(getattr(s, role)), flag) for role, flag in ROLES.items() if getattr(s, role)}
    except InputImageError as e:
        return str(e)
    if "mask" in sizes and aspect_differs(sizes["mask"], sizes["init_image"]):
        (mw, mh), (iw, ih) = sizes["mask"], sizes["init_image"]
        return f"--mask {s.mask} is {mw}x{mh}, not the aspect ratio of --init-image {s.init_image} ({iw}x{ih})"
    return None


def first_step(num_steps: int, strength: float) -> int:
    """scheduler.first_step, here without torch so that planning stays fast."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def input_metadata(s) -> dict:
    """Picture inputs of Settings `s` for the metadata: each file's path and sha256, and the mode's settings."""
    meta: dict = {}
    for role in ROLES:
        if getattr(s, role):
            meta[role] = str(Path(getattr(s, role)).resolve())
            meta[f"{role}_sha256"] = file_hash(meta[role])
    if s.init_image and s.strength is not None:
        meta["strength"] = s.strength
    if s.control_image:
        meta.update(control_scale=s.control_scale, controlnet=str(Path(s.controlnet).resolve()))
    return meta


_HASHES: dict[tuple, str] = {}


def file_hash(path: str) -> str:
    """sha256 of a file, computed once per path, size and modification time."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256(Path(path))
    return _HASHES[key]


def recorded_inputs_problem(meta: dict, given: dict) -> str | None:
    """Why the picture inputs recorded in an image's metadata cannot be used again (a file missing or changed);
    inputs replaced by flags in `given` are not checked."""
    for role, flag in ROLES.items():
        if role not in meta or given.get(role) is not None:
            continue
        path = Path(meta[role])
        if not path.is_file():
            return f"--from-png: its {flag} {path} is not there any more (give {flag} FILE)"
        if meta.get(f"{role}_sha256") and file_hash(str(path)) != meta[f"{role}_sha256"]:
            return f"--from-png: its {flag} {path} has changed since the image was made (sha256 differs)"
    return None


def steps_run(s) -> int:
    """How many denoising steps an image of Settings `s` runs (fewer than --num-steps from an init image)."""
    return s.num_steps - first_step(s.num_steps, s.strength) if s.init_image and s.strength else s.num_steps
