"""LoRA, LoHa and LoKr adapter files: read from their safetensors header in any key dialect (lora_keys.py), checked
against the model's shapes, and merged as float32 weight deltas while the base weights load."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from . import singlefile
from .lora_keys import COMPONENTS, Target, aliases, family, locate, split_key
from .lora_updates import lora_factors, module_delta, module_factors  # noqa: F401 (module_factors: API)
from .gguf import pieces_of
from .modelfiles import ModelFiles, gguf_source, weights_header
from .weights import Piece, WeightsError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps r and lora_alpha

KINDS = {  # kind -> the parts that make one complete module of it
    "lora": ("lora_down", "lora_up"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": (),  # lokr_w1 or its _a/_b factors, and lokr_w2 or its factors: checked in `lokr_shape`
}


class LoraError(WeightsError):
    """A LoRA file cannot be used: unreadable, a pickle, made for another model, or incomplete."""


@dataclass(frozen=True)
class Module:
    """One adapted module of a LoRA file: its kind, its tensors' names in the file, and its target weights."""

    name: str  # the module name as the file spells it (without the part suffix)
    component: str
    kind: str
    parts: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    targets: tuple[Target, ...]
    alpha: float | None = None  # from PEFT metadata, when the file has no `.alpha` tensor


@dataclass
class Lora:
    """A LoRA file read from its header: the modules that fit Z-Image, and the names of keys that fit nothing."""

    path: Path
    modules: list[Module]
    unmatched: list[str] = field(default_factory=list)

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def model_shapes(source: ModelFiles | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Weight shapes of the transformer and the text encoder under our module keys, from the headers of a folder or
    of the run's single files (no config is read, no model built)."""
    files = ModelFiles.of(source)
    out = {}
    for name in COMPONENTS:
        infos = {n: info for n, (_, info) in weights_header(files, name).items()}
        if gguf_source(files, name) is not None:
            of = pieces_of(name)
            found = {k: p for n in infos for k, p in of(n).items()}
        elif files.file(name) is not None:
            found = singlefile.pieces(name, infos)
        elif name == "text_encoder":
            found = {k: p for n in infos for k, p in singlefile.text_encoder_pieces_of(n).items()}
        else:
            found = {n: Piece(n) for n in infos}
        out[name] = singlefile.piece_shapes(infos, found)
    return out


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a LoRA file, refusing anything but safetensors (pickles are never loaded)."""
    if not path.is_file():
        raise LoraError(f"LoRA file {path} not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA file {path} is a pickle ({path.suffix}), which can run code when loaded and is never "
                        "read; use a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for garbled files
        raise LoraError(f"LoRA file {path} is not a readable safetensors file ({' '.join(str(e).split())})") from None


def peft_alphas(metadata: dict[str, str], path: Path) -> Callable[[str, str, int], float | None]:
    """A lookup (component, module, rank) -> alpha from the PEFT config diffusers stores in the file's metadata, or
    from peft's adapter_config.json beside adapter_model.safetensors; None when neither says."""
    configs: dict[str, dict] = {}
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError:
            flat = {}
        for k, v in flat.items():
            component, _, name = k.partition(".")
            configs.setdefault(component, {})[name] = v
    elif (path.parent / "adapter_config.json").is_file():
        try:
            cfg = json.loads((path.parent / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            cfg = {}
        configs = {c: cfg for c in COMPONENTS}

    def alpha(component: str, module: str, rank: int) -> float | None:
        cfg = configs.get(component)
        if not cfg or "lora_alpha" not in cfg:
            return None
        value = cfg["lora_alpha"]
        for pattern, a in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's own pattern rule (peft.utils.other.get_pattern_key)
                value = a
                break
        if cfg.get("use_rslora"):  # rsLoRA scales by alpha/sqrt(r); returned as the alpha giving that over r
            return value * rank / math.sqrt(rank)
        return value

    return alpha


def read_lora(path: Path, shapes: dict[str, dict[str, tuple[int, ...]]]) -> Lora:
    """Read a LoRA file's header and map its keys onto the weights in `shapes` (component -> our key -> shape).

    Raises LoraError when the file is unreadable or a pickle, when none of its keys fits Z-Image (naming the model
    family its keys suggest), when a module lacks a part, or when a module's shape does not fit (naming the key)."""
    header, metadata = read_header(path)
    tables = {c: aliases(c, shapes.get(c, {})) for c in COMPONENTS}
    peft_alpha = peft_alphas(metadata, path)
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    where: dict[tuple[str, str], tuple[Target, ...]] = {}
    unmatched = []
    for key in header:
        split = split_key(key)
        found = locate(split[0], tables) if split else None
        if found is None:
            unmatched.append(key)
            continue
        component, name, targets = found
        grouped.setdefault((component, name), {})[split[1]] = key
        where[(component, name)] = targets
    for group, parts in list(grouped.items()):
        if set(parts) == {"alpha"}:  # an alpha without its module's matrices adapts nothing
            unmatched.append(parts["alpha"])
            del grouped[group]
    if not grouped:
        raise LoraError(f"this LoRA does not fit Z-Image: its keys look like {family(list(header))} "
                        f"(for example '{next(iter(header), '(no tensors)')}'): {path}")
    modules = [build_module(path, c, name, parts, header, where[(c, name)], shapes[c], peft_alpha)
               for (c, name), parts in grouped.items()]
    return Lora(path, drop_redundant(modules), unmatched)


def build_module(path, component, name, parts, header, targets, shapes, peft_alpha) -> Module:
    """One module, checked to be complete and to fit the shapes of its targets."""
    part_shapes = {p: header[k] for p, k in parts.items()}
    kind = "loha" if any(p.startswith("hada_") for p in parts) else "lokr" if any(
        p.startswith("lokr_") for p in parts) else "lora"
    first = next(iter(parts.values()))
    for p in KINDS[kind]:
        if p not in parts:
            raise LoraError(f"LoRA file {path.name}: '{first}' has no matching '{p}' tensor")
    try:
        out, inp = delta_shape(kind, part_shapes)
    except ValueError as e:
        raise LoraError(f"LoRA file {path.name}: '{first}' {e}") from None
    want = shapes[targets[0].key]
    want = (want[0] * targets[0].count, want[1])
    if (out, inp) != want:
        raise LoraError(f"LoRA file {path.name}: '{first}' makes a {out}x{inp} update but Z-Image's "
                        f"{component} weight '{targets[0].key}' is {want[0]}x{want[1]}: the LoRA is for another "
                        "model size")
    alpha = None
    if "alpha" not in parts and kind == "lora":
        alpha = peft_alpha(component, name, part_shapes["lora_down"][0])
    return Module(name, component, kind, parts, part_shapes, targets, alpha)


def delta_shape(kind: str, s: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(out, in) of the update a module makes, from its parts' shapes; ValueError when they do not chain."""
    def mat(p):  # kohya stores linear LoRAs of 1x1 convolutions with trailing 1s
        shape = s[p]
        if len(shape) < 2 or any(d != 1 for d in shape[2:]):
            raise ValueError(f"has shape {list(shape)}, not a matrix")
        return shape[0], shape[1]

    if kind == "lora":
        (r, inp), (out, r2) = mat("lora_down"), mat("lora_up")
        if r != r2:
            raise ValueError(f"has rank {r} but its up matrix has rank {r2}")
        return out, inp
    if kind == "loha":
        (o1, r1), (r1b, i1), (o2, r2), (r2b, i2) = (mat(p) for p in KINDS["loha"])
        if r1 != r1b or r2 != r2b or (o1, i1) != (o2, i2):
            raise ValueError("has LoHa factors whose shapes do not chain")
        return o1, i1
    w1, w2 = (lokr_shape(s, n) for n in ("w1", "w2"))
    return w1[0] * w2[0], w1[1] * w2[1]


def lokr_shape(s: dict[str, tuple[int, ...]], n: str) -> tuple[int, int]:
    if f"lokr_{n}" in s:
        return s[f"lokr_{n}"][0], s[f"lokr_{n}"][1]
    if f"lokr_{n}_a" in s and f"lokr_{n}_b" in s:
        a, b = s[f"lokr_{n}_a"], s[f"lokr_{n}_b"]
        if a[1] != b[0]:
            raise ValueError(f"has LoKr factors lokr_{n}_a/b whose shapes do not chain")
        return a[0], b[1]
    raise ValueError(f"has no lokr_{n} (or lokr_{n}_a and lokr_{n}_b) tensor")


def drop_redundant(modules: list[Module]) -> list[Module]:
    """Without fused `qkv` (and bare `out`) modules whose weights split modules of the same file also adapt: some
    trainers save both spellings of one update (diffusers skips the fused copy the same way)."""
    split = {t.key for m in modules if len(m.targets) == 1 and not is_alias(m) for t in m.targets}
    return [m for m in modules if not (is_alias(m) and any(t.key in split for t in m.targets))]


def is_alias(m: Module) -> bool:
    return bool(re.search(r"(^|[._])(qkv|out)$", m.name))


class LoraSet:
    """LoRA files with their scales, merged together: the float32 delta for any weight key, and load-time patches.

    Loaders that do not go through `weights.load_pieces` (quantized, GGUF) ask `keys(component)` which weights
    change, and `delta(component, key)` or `merge_into(component, key, weight)` for each, or `factors(component,
    key)` for a weight that stays quantized (all of it bundled per component by `patch`)."""

    def __init__(self, loras: list[tuple[Lora, float]]):
        self.loras = loras
        self.index: dict[str, dict[str, list[tuple[int, Module, Target, float]]]] = {c: {} for c in COMPONENTS}
        for i, (lora, scale) in enumerate(loras):
            for m in lora.modules:
                for t in m.targets:
                    self.index[m.component].setdefault(t.key, []).append((i, m, t, scale))
        self._files: dict[int, object] = {}

    def touches(self, component: str) -> bool:
        return bool(self.index[component])

    def keys(self, component: str) -> set[str]:
        return set(self.index[component])

    def _tensor(self, i: int, name: str) -> Tensor:
        path = self.loras[i][0].path
        try:
            if i not in self._files:  # mapped again for each weight, so that the file never becomes resident whole
                self._files[i] = safe_open(str(path), framework="pt")
            return self._files[i].get_tensor(name).float()
        except Exception as e:  # changed or removed since it was checked
            raise LoraError(f"LoRA file {path} could not be read ({' '.join(str(e).split())})") from None

    def delta(self, component: str, key: str) -> Tensor | None:
        """The summed `scale * update` of every LoRA for weight `key` (float32, the weight's shape), or None."""
        total = None
        for i, module, target, scale in self.index[component].get(key, []):
            d = module_delta(module, lambda name, i=i: self._tensor(i, name), target)
            d.mul_(scale)
            total = d if total is None else total.add_(d)
        self.close()
        return total

    def merge_into(self, component: str, key: str, weight: Tensor) -> None:
        """Add every LoRA's `scale * update` for `key` to a float32 weight in place; a plain LoRA goes in with one
        addmm, so no update-sized buffer is ever made."""
        for i, module, target, scale in self.index[component].get(key, []):
            read = lambda name, i=i: self._tensor(i, name)  # noqa: E731
            if module.kind == "lora":
                down, up, s = lora_factors(module, read, target)
                weight.addmm_(up, down, alpha=scale * s)
            else:
                weight.add_(module_delta(module, read, target), alpha=scale)
        self.close()

    def factors(self, component: str, key: str) -> tuple[Tensor | None, Tensor]:
        """The summed `scale * update` for `key` as float32 factors (down, up) with up @ down equal to it, the
        LoRAs' ranks stacked and each scale folded into its up; (None, update) when the factors would hold more
        values than the update itself (a high total rank, or a LoKr with a whole w2)."""
        downs, ups = [], []
        for i, module, target, scale in self.index[component].get(key, []):
            pair = module_factors(module, lambda name, i=i: self._tensor(i, name), target)
            if pair is None:
                break
            downs.append(pair[0])
            ups.append(pair[1].mul_(scale))
        else:
            self.close()
            down, up = torch.cat(downs), torch.cat(ups, dim=1)
            if down.shape[0] * (up.shape[0] + down.shape[1]) < up.shape[0] * down.shape[1]:
                return down, up
        return None, self.delta(component, key)

    def patch(self, component: str) -> "LoraPatch | None":
        """The LoRAs of `component` as loaders apply them (see LoraPatch); None when no LoRA touches it."""
        return LoraPatch(self, component, frozenset(self.index[component])) if self.touches(component) else None

    def close(self) -> None:
        """Unmap the LoRA files (the next read maps them again)."""
        self._files.clear()


@dataclass(frozen=True)
class LoraPatch:
    """The LoRAs of one component for the loaders: called as a `weights.load_weights` patch it merges them into a
    weight read as floats, in float32 (a float32 weight in place: its memory-mapped pages become its private copy,
    not a second buffer); `factors(key)` gives them for a weight kept quantized (lowrank.py)."""

    loras: LoraSet
    component: str
    keys: frozenset[str]

    def __call__(self, key: str, weight: Tensor) -> Tensor:
        if key not in self.keys:
            return weight
        weight = weight.float()
        self.loras.merge_into(self.component, key, weight)
        return weight

    def factors(self, key: str) -> tuple[Tensor | None, Tensor]:
        return self.loras.factors(self.component, key)
