"""What a run will make: per-image settings from flags, prompt files and PNG metadata, validated before any
weights are loaded, and the output file of each image."""

from __future__ import annotations

import json
import os
import re
import string
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UsageError
from .images import FORMATS
from .inputs import INPUT_FIELDS, InputImageError, input_metadata, inputs_problem, picture_defaults

MAX_SEED = 2**64 - 1
DEFAULT_GUIDANCE_WITH_NEGATIVE = 5.0
JSONL_FIELDS = {"prompt", "negative_prompt", "seed", "width", "height", "num_steps", "guidance_scale", "output",
                "init_image", "strength", "mask", "control_image", "control_scale",
                "cfg_normalization", "cfg_truncation", "num_images", "loras"}
PLACEHOLDERS = {"index", "seed", "prompt"}


class ItemError(Exception):
    """One item of a batch is unusable; it is reported with its origin and skipped."""


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file to merge, with its scale; sha256 is filled in once the file has been checked."""

    path: str
    scale: float = 1.0
    sha256: str = ""


def parse_lora(spec: str, base: Path | None = None) -> LoraRef:
    """`FILE` or `FILE:SCALE` (scale 1.0 by default); a relative FILE is taken from `base` (default: the current
    folder). A colon followed by something that is not a number belongs to the file name."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not path.strip():
        raise ValueError(f"--lora '{spec}' names no file")
    p = Path(path).expanduser()
    return LoraRef(str((base / p if base is not None and not p.is_absolute() else p).absolute()), scale)


def parse_loras(value, base: Path | None) -> tuple[LoraRef, ...]:
    """The `loras` field of a JSONL line: a list of "path[:scale]" strings or {"path": ..., "scale": ...} objects."""
    if not isinstance(value, list):
        raise ValueError("\"loras\" must be a list of \"path:scale\" strings or {\"path\", \"scale\"} objects")
    out = []
    for v in value:
        if isinstance(v, str):
            out.append(parse_lora(v, base))
        elif isinstance(v, dict) and isinstance(v.get("path"), str) and set(v) <= {"path", "scale"} and \
                isinstance(v.get("scale", 1.0), (int, float)) and not isinstance(v.get("scale"), bool):
            ref = parse_lora(v["path"] + ":0", base)  # the ":0" keeps colons in the path part of the name
            out.append(LoraRef(ref.path, float(v.get("scale", 1.0))))
        else:
            raise ValueError(f"\"loras\" entry {v!r} must be \"path:scale\" or {{\"path\": ..., \"scale\": ...}}")
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    """Everything that determines one image."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_steps: int = 8
    guidance_scale: float = 0.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    seed: int = 0
    loras: tuple[LoraRef, ...] = ()
    init_image: str | None = None  # start from this picture (image-to-image; inpainting with `mask`)
    strength: float | None = None  # None: the reference's default for the mode (inputs.picture_defaults)
    mask: str | None = None  # white = repaint, black = keep
    control_image: str | None = None  # ControlNet condition, used as given
    control_scale: float = 0.75  # the reference's controlnet_conditioning_scale default
    controlnet: str | None = None  # ControlNet checkpoint (folder or file)


@dataclass(frozen=True)
class Job:
    """One image to make: its settings, the file it goes to, and where it came from (for messages)."""

    settings: Settings
    output: Path
    index: int
    origin: str
    model: str
    write: bool = True  # False: its file is already made; it runs only to keep its batch as first planned

    @property
    def metadata(self) -> dict:
        s = self.settings
        return {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "steps": s.num_steps,
                "guidance": s.guidance_scale, "cfg_normalization": s.cfg_normalization,
                "cfg_truncation": s.cfg_truncation, "seed": s.seed, "width": s.width, "height": s.height,
                "model": Path(os.path.abspath(self.model)).name, "model_path": os.path.abspath(self.model),
                "model_path_given": self.model,  # the absolute path re-runs from any folder; as typed, for the record
                **({"loras": [{"name": Path(r.path).name, "path": r.path, "sha256": r.sha256, "scale": r.scale}
                              for r in s.loras]} if s.loras else {}), **input_metadata(s)}


def round16(n: int, up: bool) -> int:
    return max(16, (n + 15) // 16 * 16 if up else n // 16 * 16)


def size_problem(width: int, height: int, max_side: int) -> str | None:
    """Why width x height cannot be generated, with valid sizes to try; None when it can."""
    if width <= 0 or height <= 0:
        w, h = (min(max(n, 16), max_side) for n in (width, height))
        return (f"width and height must be positive (got {width}x{height}). "
                f"Try {round16(w, False)}x{round16(h, False)}")
    if width > max_side or height > max_side:
        w, h = min(width, max_side), min(height, max_side)
        return (f"{width}x{height} is too large: each side must be at most {max_side} px, the span of the model's "
                f"position tables. Try {round16(w, False)}x{round16(h, False)}")
    if width % 16 or height % 16:
        lo, hi = f"{round16(width, False)}x{round16(height, False)}", f"{round16(width, True)}x{round16(height, True)}"
        hi = hi if round16(width, True) <= max_side and round16(height, True) <= max_side else lo
        tries = lo if lo == hi else f"{lo} or {hi}"
        return f"{width}x{height}: width and height must be multiples of 16. Try {tries}"
    return None


def settings_problem(s: Settings, max_side: int) -> str | None:
    """The first reason these settings cannot run, checked without loading anything; None when they can."""
    if not s.prompt.strip():
        return "the prompt is empty"
    if problem := size_problem(s.width, s.height, max_side):
        return problem
    if s.num_steps < 1:
        return f"--num-steps must be at least 1 (got {s.num_steps})"
    if s.guidance_scale < 0:
        return f"--guidance-scale must be 0 or more (got {s.guidance_scale})"
    if s.cfg_normalization < 0:
        return f"--cfg-normalization must be 0 (off) or more (got {s.cfg_normalization})"
    if not 0 <= s.seed <= MAX_SEED:
        return f"--seed must be between 0 and 2**64-1 (got {s.seed})"
    return None


def output_problem(path: Path) -> str | None:
    """Why an image cannot be written at `path`; None when it can (missing folders are created later)."""
    if path.is_dir():
        return f"{path} is a directory; give a file name such as {path / 'image.png'}"
    if path.suffix.lower() not in FORMATS:
        return f"{path}: unsupported image type '{path.suffix or '(none)'}'; use .png, .jpg, .jpeg or .webp"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create folder {path.parent}: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write to folder {parent} (permission denied)"
    return None


def template_fields(template: str) -> set[str]:
    try:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UsageError(f"bad output template '{template}': {e}") from None


def check_template(template: str) -> None:
    unknown = template_fields(template) - PLACEHOLDERS
    if unknown:
        raise UsageError(f"output template '{template}' uses unknown placeholder {{{sorted(unknown)[0]}}}; "
                         "use {index}, {seed} or {prompt}")
    try:
        template.format(index=0, seed=0, prompt="p")
    except (ValueError, IndexError, KeyError) as e:
        raise UsageError(f"bad output template '{template}': {e}") from None


# names Windows refuses whatever the extension (CON.png is the console)
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{d}{n}" for d in ("com", "lpt") for n in "123456789¹²³")}


def slug_char(c: str) -> str:
    """`c` if it may stand in a file name on Linux, macOS and Windows, else '-'. Keeps letters, digits and
    marks of every script and pictographs (emoji); drops punctuation, separators and control characters, which
    include every character Windows reserves (<>:"/\\|?*)."""
    cat = unicodedata.category(c)
    keep = cat[0] in "LNM" or cat == "So" or (cat == "Sk" and not c.isascii()) or c == "\u200d"  # ZWJ joins emoji
    return c if keep else "-"


def slug(prompt: str, limit: int = 40, max_bytes: int = 120) -> str:
    """A short name for a prompt that is safe as (part of) a file name on Linux, macOS and Windows: at most
    `limit` characters and `max_bytes` UTF-8 bytes, never a name Windows reserves, 'image' when nothing is left."""
    text = "".join(slug_char(c) for c in unicodedata.normalize("NFC", prompt).lower())
    s = re.sub(r"-+", "-", text).strip("-")[:limit]
    s = s.encode()[:max_bytes].decode(errors="ignore").rstrip("-\u200d")
    if s in WINDOWS_RESERVED:
        s += "_"
    return s or "image"


def render_output(template: str, index: int, seed: int, prompt: str, numbered: bool) -> Path:
    """The file for image `index`; when `numbered`, `-0000`... goes before the extension. A quoted ~ is expanded."""
    path = Path(template.format(index=index, seed=seed, prompt=slug(prompt))).expanduser()
    return path.with_name(f"{path.stem}-{index:04d}{path.suffix}") if numbered else path


@dataclass(frozen=True)
class Item:
    """One prompt entry before expansion into images: field overrides and where it came from."""

    fields: dict
    origin: str
    from_cli: bool = False  # given with --prompt: its problems are usage errors
    line: int = 0  # its line in the prompts file, to report problems in line order


def jsonl_problem(line: str) -> tuple[dict, str | None]:
    """The object on a JSONL line, and why it cannot be used (None when it can)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return {}, "expected a JSON object with a \"prompt\""
    if unknown := set(obj) - JSONL_FIELDS:
        return obj, f"unknown field \"{sorted(unknown)[0]}\" (known: {', '.join(sorted(JSONL_FIELDS))})"
    if not isinstance(obj.get("prompt"), str):
        return obj, "\"prompt\" must be a string"
    return obj, None


def read_prompt_lines(text: str, name: str, jsonl: bool,
                      base: Path | None = None) -> tuple[list[Item], list[tuple[Item, str]]]:
    """Items from a prompts file: one prompt a line, or one JSON object a line for JSONL (LoRA paths in it relative
    to `base`). Returns the items and the lines that were skipped, with why."""
    items, errors = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        origin = f"{name} line {n}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not jsonl:
            items.append(Item({"prompt": line.strip()}, origin, line=n))
            continue
        obj, problem = jsonl_problem(line)
        if not problem and "loras" in obj:
            try:
                obj["loras"] = parse_loras(obj["loras"], base)
            except ValueError as e:
                problem = str(e)
        if problem:
            errors.append((Item({}, origin, line=n), f"{origin}: {problem}"))
        else:
            items.append(Item(obj, origin, line=n))
    return items, errors


def looks_like_jsonl(text: str) -> bool:
    """JSONL when the first line that is not blank or a # comment starts with '{' (as no plain prompt does)."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return first.startswith("{")


def read_prompts_file(path: str) -> tuple[list[Item], list[tuple[Item, str]]]:
    """Items of a prompts file (`-`: stdin), read as JSONL when named .jsonl or when its content is JSONL."""
    if path == "-":
        text = sys.stdin.read().removeprefix("\ufeff")  # a byte-order mark is not part of the first prompt
        return read_prompt_lines(text, "stdin", jsonl=looks_like_jsonl(text))
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"prompts file {p} is a folder; give a text or .jsonl file")
    if not p.is_file():
        raise UsageError(f"prompts file {p} not found")
    try:
        text = p.read_text(encoding="utf-8-sig")  # utf-8, dropping a byte-order mark that editors may write
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {p}: {e}") from None
    items, errors = read_prompt_lines(text, p.name, jsonl=p.suffix.lower() == ".jsonl" or looks_like_jsonl(text),
                                      base=p.parent)
    return [relative_to(item, p.parent) for item in items], errors


def relative_to(item: Item, folder: Path) -> Item:
    """The item with its relative picture paths taken as relative to `folder` (the JSONL file's)."""
    fields = {k: str(folder / v) if k in INPUT_FIELDS and isinstance(v, str) else v for k, v in item.fields.items()}
    return replace(item, fields=fields)


TYPES = {"prompt": str, "negative_prompt": str, "seed": int, "width": int, "height": int, "num_steps": int,
         "guidance_scale": float, "cfg_normalization": float, "cfg_truncation": float, "output": str,
         "num_images": int, "init_image": str, "strength": float, "mask": str, "control_image": str,
         "control_scale": float}


def typed(fields: dict, origin: str) -> dict:
    """Check the JSON types of an item's fields (ints must be integers; floats may be integers)."""
    out = {}
    for k, v in fields.items():
        if k == "loras":  # already parsed into LoraRefs when the line was read
            out[k] = v
            continue
        want = TYPES[k]
        ok = isinstance(v, str) if want is str else (
            isinstance(v, int) and not isinstance(v, bool) if want is int else
            isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok:
            raise ItemError(f"{origin}: \"{k}\" must be {'a string' if want is str else 'a number'} (got {v!r})")
        out[k] = float(v) if want is float else v
    return out


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]
    errors: list[tuple[Item, str]]  # items (or images of items) that will not run, and why


def plan_jobs(base: dict, items: list[Item], output: str, num_images: int, model: str, max_side: int,
              guidance_given: bool, size_given: tuple[bool, bool] = (True, True)) -> Plan:
    """Expand items into jobs: per-item fields over `base` settings. Images are indexed in input order,
    counting only those whose settings can run (bad lines leave no gap); image `index` gets seed
    `seed + index` (`seed + k` within an item that names its own seed) and its file from the output template,
    numbered when the template alone does not give every image its own name. Problems of single items become
    errors, in input order; the other items still run. Existing files are not looked at here (resume.triage)."""
    check_template(output)
    errors: list[tuple[Item, str]] = []
    expanded: list[tuple[Item, dict, str | None, int]] = []
    for item in items:
        try:
            fields = typed(item.fields, item.origin)
            count = fields.pop("num_images", num_images)
            item_output = fields.pop("output", None)
            if count < 1:
                raise ItemError(f"{item.origin}: num_images must be at least 1")
            if item_output is not None:
                check_template(item_output)
        except (ItemError, UsageError) as e:
            errors.append((item, str(e) if isinstance(e, ItemError) else f"{item.origin}: {e}"))
            continue
        expanded += [(item, fields, item_output, k) for k in range(count)]

    named: list[tuple[Item, Settings, str, int]] = []
    for item, fields, item_output, k in expanded:
        merged = {**base, **fields}
        if not guidance_given and "guidance_scale" not in fields:
            merged["guidance_scale"] = DEFAULT_GUIDANCE_WITH_NEGATIVE if merged["negative_prompt"] else 0.0
        try:
            merged = picture_defaults(merged, fields, size_given)
        except InputImageError as e:
            errors.append((item, f"{item.origin}: {e}"))
            continue
        if problem := settings_problem(Settings(**merged), max_side) or inputs_problem(Settings(**merged)):
            errors.append((item, f"{item.origin}: {problem}"))
            continue
        index = len(named)
        merged["seed"] = (merged["seed"] + (k if "seed" in fields else index)) % (MAX_SEED + 1)
        named.append((item, Settings(**merged), item_output or output, index))

    plain = Counter((t, render_output(t, i, s.seed, s.prompt, False)) for _, s, t, i in named)
    numbered = {t for (t, _), n in plain.items() if n > 1}  # templates that give two images one name
    if not template_fields(output) and len(expanded) > 1:
        numbered.add(output)  # a plain name shared by the run: numbered even where it is used once
    jobs: list[Job] = []
    seen: dict[Path, str] = {}
    for item, settings, template, index in named:
        path = render_output(template, index, settings.seed, settings.prompt, template in numbered)
        problem = output_problem(path)
        if not problem and path in seen:
            problem = f"output {path} is also the output of {seen[path]}"
        if problem:
            errors.append((item, f"{item.origin}: {problem}"))
            continue
        seen[path] = item.origin
        jobs.append(Job(settings, path, index, item.origin, model))
    return Plan(jobs, sorted(errors, key=lambda e: e[0].line))


def settings_from(meta: dict) -> dict:
    """Settings stored in an image's metadata, as keyword overrides."""
    keys = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "num_steps",
            "guidance": "guidance_scale", "cfg_normalization": "cfg_normalization",
            "cfg_truncation": "cfg_truncation", "seed": "seed", "width": "width", "height": "height",
            **{k: k for k in (*INPUT_FIELDS, "strength", "control_scale", "controlnet")}}
    out = {ours: meta[theirs] for theirs, ours in keys.items() if theirs in meta}
    if isinstance(meta.get("loras"), list):
        out["loras"] = tuple(LoraRef(str(r.get("path", "")), float(r.get("scale", 1.0)), str(r.get("sha256", "")))
                             for r in meta["loras"] if isinstance(r, dict))
    return out
