"""Verifying a checkpoint folder against the published layout, without loading tensor data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .scheduler import SchedulerConfig
from .transformer import TransformerConfig, ZImageTransformer
from .vae import AutoencoderKL, VAEConfig
from .layout import missing_hint
from .weights import (CONFIG_NAMES, TOKENIZER_FILES, WEIGHT_STEMS, MissingFileError, WeightsError,
                      checkpoint_header, expected_shapes, find_gguf, human_bytes, match_keys, read_config, read_json,
                      weight_files)

COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "transformer", "vae")


def require_layout(model_path: Path) -> None:
    """Fail with MissingFileError naming the first file of the published layout that is absent: the model index,
    a component folder, a config, the tokenizer, or a weight file or shard listed in an index."""
    if not model_path.is_dir():
        raise MissingFileError(f"model folder {model_path} not found")
    read_json(model_path / "model_index.json")
    for name in COMPONENTS:
        folder = model_path / name
        if not folder.is_dir():
            raise MissingFileError(f"missing component folder {folder}")
        if name in CONFIG_NAMES:
            read_json(folder / CONFIG_NAMES[name])
        if name == "tokenizer":
            require_tokenizer(folder)
        if name in WEIGHT_STEMS and find_gguf(folder, WEIGHT_STEMS[name]) is None:
            weight_files(folder, WEIGHT_STEMS[name])


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


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def expected_text_encoder(folder: Path) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, Qwen3Model

    cfg = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        return expected_shapes(Qwen3Model(cfg))


def expected_for(model_path: Path, name: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the component its config describes, built on the meta device (no memory, no data).
    Any failure to build it is the config's fault and raises WeightsError naming the config."""
    folder = model_path / name
    try:
        with torch.device("meta"):
            if name == "transformer":
                return expected_shapes(ZImageTransformer(TransformerConfig.from_json(folder / "config.json")))
            if name == "vae":
                return expected_shapes(AutoencoderKL(VAEConfig.from_json(folder / "config.json")))
        return expected_text_encoder(folder)
    except Exception as e:  # bad values surface as TypeError, ValueError or library-specific errors
        raise WeightsError(f"{folder / CONFIG_NAMES[name]}: {one_line(e)}") from None


def text_encoder_key(name: str) -> str | None:
    return None if name.startswith("lm_head.") else name.removeprefix("model.")


@dataclass
class ComponentReport:
    name: str
    ok: bool
    files: int = 0
    parameters: int = 0
    dtypes: list[str] = field(default_factory=list)
    bytes: int = 0
    problem: str | None = None

    def line(self) -> str:
        if not self.ok:
            return f"{self.name:<13} FAIL  {self.problem}"
        if not self.files:
            return f"{self.name:<13} ok"
        return (f"{self.name:<13} ok    {self.files} file(s), {self.parameters:,} parameters, "
                f"{'/'.join(self.dtypes)}, {human_bytes(self.bytes)}")


def gguf_report(model_path: Path, name: str, path: Path) -> ComponentReport:
    """The report of a GGUF file standing in for a component: its tensors checked against the config (for the
    text encoder, the layers Z-Image runs), sizes as stored."""
    from .gguf import text_encoder_keys, transformer_keys
    from .quant import matched_gguf

    if name == "transformer":
        expected, convert, arch = expected_for(model_path, name), transformer_keys, "lumina2"
    elif name == "text_encoder":
        from transformers import Qwen3Model

        from .text_encoder import encoder_config

        cfg = encoder_config(model_path / name)
        with torch.device("meta"):
            model = Qwen3Model(cfg)
        model.norm = torch.nn.Identity()
        expected, convert, arch = expected_shapes(model), text_encoder_keys(cfg.num_hidden_layers), "qwen3"
    else:
        raise WeightsError(f"{path}: zimage reads GGUF files for the transformer and the text encoder only")
    tensors = matched_gguf(path, expected, convert, (arch,))
    return ComponentReport(name, True, files=1, parameters=sum(math.prod(t.shape) for t in tensors.values()),
                           dtypes=sorted({t.qtype.name for t in tensors.values()}),
                           bytes=sum(t.nbytes for t in tensors.values()))


def check_component(model_path: Path, name: str) -> ComponentReport:
    """The report of one component; never raises, so that every component gets its line."""
    folder = model_path / name
    try:
        if not folder.is_dir():
            raise MissingFileError(f"missing component folder {folder}")
        if name == "scheduler":
            read_config(SchedulerConfig.from_json, folder / CONFIG_NAMES[name])
            return ComponentReport(name, True)
        if name == "tokenizer":
            require_tokenizer(folder)
            return ComponentReport(name, True)
        read_json(folder / CONFIG_NAMES[name])
        if (path := find_gguf(folder, WEIGHT_STEMS[name])) is not None:
            return gguf_report(model_path, name, path)
        header = checkpoint_header(folder, WEIGHT_STEMS[name])
        rename = text_encoder_key if name == "text_encoder" else (lambda k: k)
        match_keys(header, expected_for(model_path, name), rename, folder)
        infos = [info for _, info in header.values()]
        return ComponentReport(name, True, files=len({p for p, _ in header.values()}),
                               parameters=sum(i.numel for i in infos),
                               dtypes=sorted({i.dtype for i in infos}), bytes=sum(i.nbytes for i in infos))
    except MissingFileError as e:
        return ComponentReport(name, False, problem=missing_hint(e, model_path))
    except WeightsError as e:
        return ComponentReport(name, False, problem=one_line(e))
    except Exception as e:  # unforeseen: still one line for this component, and the others still get checked
        return ComponentReport(name, False, problem=f"{type(e).__name__}: {one_line(e)}")


def check_model(model_path: Path) -> list[ComponentReport]:
    """One report per component; `model_index.json` problems are reported as the component `model_index`.
    Only a missing model folder stops the check early: otherwise every component is checked, so that one run
    lists everything that needs downloading again."""
    if model_path.is_file():
        return [ComponentReport("model_index", False, problem=f"{model_path} is a file, not a checkpoint folder")]
    if not model_path.is_dir():
        return [ComponentReport("model_index", False, problem=missing_hint(
            MissingFileError(f"model folder {model_path} not found"), model_path))]
    try:
        read_json(model_path / "model_index.json")
        report = ComponentReport("model_index", True)
    except MissingFileError as e:
        report = ComponentReport("model_index", False, problem=missing_hint(e, model_path))
    except WeightsError as e:
        report = ComponentReport("model_index", False, problem=one_line(e))
    return [report] + [check_component(model_path, name) for name in COMPONENTS]
