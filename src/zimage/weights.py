"""Reading checkpoints in the published layout: configs, single-file or sharded safetensors, lean loading."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import MissingFileError, WeightsError  # noqa: F401  (defined without torch for the CLI)
from .layout import DOWNLOAD_HINT  # noqa: F401
from .tensorfile import Staging, host_empty, stream

T = TypeVar("T")

# component folder -> safetensors file stem, as published
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIG_NAMES = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
TOKENIZER_FILES = ("tokenizer_config.json",)

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def human_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (a small checkpoint is not '0.00 GiB')."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def read_config(parse: Callable[[Path], T], path: Path) -> T:
    """A config parsed by `parse`, with any problem reported as a WeightsError that names the file."""
    read_json(path)  # names the file when it is missing or not a JSON object
    try:
        return parse(path)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {' '.join(str(e).split())}") from None


def read_json(path: Path) -> dict:
    """Parse a JSON file that must hold one object (every config and index does), naming the file in any error."""
    if not path.is_file():
        raise MissingFileError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):  # callers index into it; a list or a number would fail far from the file
        raise WeightsError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def require_tokenizer(folder: Path) -> None:
    """Fail with MissingFileError unless the tokenizer can be built: its config, and `tokenizer.json` or the
    `vocab.json` + `merges.txt` pair it can be rebuilt from."""
    for fname in TOKENIZER_FILES:
        read_json(folder / fname)
    if (folder / "tokenizer.json").is_file():
        return
    if (folder / "vocab.json").is_file() and not (folder / "merges.txt").is_file():
        raise MissingFileError(f"missing {folder / 'tokenizer.json'} (or {folder / 'merges.txt'} beside vocab.json)")
    if not (folder / "vocab.json").is_file():
        raise MissingFileError(f"missing {folder / 'tokenizer.json'}")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    stored: int | None = None  # bytes as stored, for block-quantized types (GGUF) whose dtype has no item size

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.stored if self.stored is not None else self.numel * DTYPE_SIZES.get(self.dtype, 4)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one safetensors file, without reading tensor data."""
    if not path.is_file():
        raise MissingFileError(f"missing {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except MissingFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); download it again") from None


def weight_files(folder: Path, stem: str) -> dict[str, Path]:
    """Map tensor name -> file for a component stored as `{stem}.safetensors` or as shards plus
    `{stem}.safetensors.index.json`. Raises MissingFileError naming any absent file."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} has no weight_map")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise MissingFileError(f"missing {path} (listed in {index.name})")
        return files
    if single.is_file():
        return {name: single for name in read_header(single)}
    raise MissingFileError(f"missing {single} (or {index.name} with its shards) in {folder}")


def find_gguf(folder: Path, stem: str) -> Path | None:
    """The GGUF file standing in for a component's safetensors (`{stem}.safetensors` and its index absent), or None.
    More than one is ambiguous and raises WeightsError."""
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if len(found) > 1:
        raise WeightsError(f"{folder} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def checkpoint_header(folder: Path, stem: str) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a component with its file, dtype and shape, checking that the index and the files agree."""
    files = weight_files(folder, stem)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for path in sorted(set(files.values())):
        for name, info in read_header(path).items():
            out[name] = (path, info)
    for name, path in files.items():
        if name not in out or out[name][0] != path:
            raise WeightsError(f"{path} does not contain tensor '{name}' that the index lists")
    return out


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Piece:
    """Where one module tensor comes from: tensor `name` of a checkpoint, or the `part`-th of `parts` equal slices
    of it along dim 0 (a fused q/k/v weight); `squeeze` drops trailing 1x1 dimensions (a 1x1 convolution kernel
    stored for a linear weight)."""

    name: str
    part: int = 0
    parts: int = 1
    squeeze: bool = False

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the checkpoint tensor must have for this piece to have `shape`."""
        if self.parts > 1:
            shape = (shape[0] * self.parts, *shape[1:])
        return (*shape, 1, 1) if self.squeeze else shape


def match_pieces(
    header: dict[str, tuple[Path, TensorInfo]],
    expected: dict[str, tuple[int, ...]],
    pieces: dict[str, Piece],
    configured_by: str,
    where: Path,
) -> None:
    """Check that `pieces` (module key -> piece of a checkpoint tensor) fill exactly the `expected` module tensors
    with the right shapes, failing with the first unexpected, misshapen or missing tensor."""
    for key, piece in pieces.items():
        path, info = header[piece.name]
        if key not in expected:
            raise WeightsError(f"{path.name}: unexpected tensor '{piece.name}' (not part of the model configured by "
                               f"{configured_by})")
        want = piece.source_shape(expected[key])
        if info.shape != want:
            raise WeightsError(f"{path.name}: tensor '{piece.name}' has shape {list(info.shape)}, "
                               f"expected {list(want)} from {configured_by}")
    missing = [k for k in expected if k not in pieces]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: tensor '{missing[0]}'{more} missing from the checkpoint")


def match_keys(
    header: dict[str, tuple[Path, TensorInfo]],
    expected: dict[str, tuple[int, ...]],
    rename: Callable[[str], str | None],
    where: Path,
) -> dict[str, str]:
    """Map module key -> checkpoint key, failing with the first missing, unexpected or misshapen tensor."""
    pieces = {key: Piece(name) for name in header if (key := rename(name)) is not None}
    match_pieces(header, expected, pieces, str(where / "config.json"), where)
    return {key: p.name for key, p in pieces.items()}


Patch = Callable[[str, torch.Tensor], torch.Tensor]  # module key, tensor as read -> tensor to load


def by_file(header: dict[str, tuple[Path, TensorInfo]], pieces: dict[str, "Piece"]) -> dict[Path, dict[str, list[str]]]:
    """file -> tensor name -> the module keys read from it (a fused tensor feeds several)."""
    files: dict[Path, dict[str, list[str]]] = {}
    for key, piece in pieces.items():
        files.setdefault(header[piece.name][0], {}).setdefault(piece.name, []).append(key)
    return dict(sorted(files.items(), key=lambda kv: str(kv[0])))


def cut(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece of a whole tensor as stored: its rows when it is a slice, squeezed when asked."""
    if piece.parts > 1:
        rows = t.shape[0] // piece.parts
        t = t[piece.part * rows : (piece.part + 1) * rows]
    return t.reshape(t.shape[:-2]) if piece.squeeze else t


def read_pieces(
    header: dict[str, tuple[Path, TensorInfo]],
    pieces: dict[str, Piece],
    convert: Callable[[str, torch.Tensor], object],
    patch: Patch | None = None,
) -> dict[str, object]:
    """Checked `pieces` (see match_pieces) read one tensor at a time, each passed through `convert(key, tensor)`
    before the next is read (tensorfile.stream: a thread reads the next tensor meanwhile; only two tensors as
    stored are in memory at a time).

    `patch(module_key, tensor)`, when given, sees each floating tensor as read (before `convert`) and returns the
    tensor to convert; a patch that changes a tensor works in float32 (LoRA merging does), and may change it in
    place (it is the loader's private copy)."""
    state: dict[str, object] = {}
    for path, names in by_file(header, pieces).items():
        try:
            for name, whole, stage in stream(path, list(names)):
                for key in names[name]:
                    t = cut(whole, pieces[key])
                    if patch is not None and t.is_floating_point():
                        t = patch(key, t.clone() if len(names[name]) > 1 else t)
                    state[key] = owned(convert(key, t), stage)
                del whole, t
        except Exception as e:
            if isinstance(e, (torch.OutOfMemoryError, KeyboardInterrupt, WeightsError)):
                raise
            raise WeightsError(f"{path} could not be read ({e}); download it again") from None
    return state


def owned(value: object, stage: Staging) -> object:
    """`value`, copied out of the staging buffer if `convert` returned the tensor as read (the buffer is refilled
    with the next tensor). Other results (quantized weights) are always made anew."""
    return value.clone() if isinstance(value, torch.Tensor) and stage.owns(value) else value


def to_target(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, floating tensors in `dtype`: on the CPU a copy in huge-page memory (tensorfile.host_empty)."""
    target = dtype if t.is_floating_point() else t.dtype
    if torch.device(device).type != "cpu":
        return t.to(device=device, dtype=target)
    return host_empty(t.shape, target).copy_(t)


def load_pieces(
    module: nn.Module,
    header: dict[str, tuple[Path, TensorInfo]],
    pieces: dict[str, Piece],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    patch: Patch | None = None,
) -> nn.Module:
    """Fill a module built on the meta device with checked `pieces` (see match_pieces), one tensor at a time,
    each converted straight to `dtype` on `device` (after `patch`, as in read_pieces)."""
    state = read_pieces(header, pieces, lambda key, t: to_target(t, dtype, device), patch)
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def load_weights(
    module: nn.Module,
    folder: Path,
    stem: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] = lambda k: k,
    patch: Patch | None = None,
) -> nn.Module:
    """Fill a module built on the meta device from a component folder, one tensor at a time.

    Each tensor is read (read_pieces) and converted straight to `dtype` on `device`, so no full-precision copy
    of the model ever exists. `rename` maps checkpoint keys to module keys (None skips);
    `patch` as in read_pieces.
    """
    header = checkpoint_header(folder, stem)
    mapping = match_keys(header, expected_shapes(module), rename, folder)
    return load_pieces(module, header, {key: Piece(name) for key, name in mapping.items()}, dtype, device, patch)


def save_weights(state: dict[str, torch.Tensor], folder: Path, stem: str, shards: int = 1) -> None:
    """Write tensors as `{stem}.safetensors`, or as `shards` files plus an index, as the published layout does."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
