"""Verifying a checkpoint folder against the published layout, without loading tensor data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .layout import missing_hint
from .modelfiles import ModelFiles, checked, scheduler_config
from .scheduler import SchedulerConfig
from .transformer import TransformerConfig, ZImageTransformer
from .vae import AutoencoderKL, VAEConfig
from .weights import (CONFIG_NAMES, WEIGHT_STEMS, MissingFileError, WeightsError,
                      checkpoint_header, expected_shapes, find_gguf, human_bytes, match_keys, read_config,
                      read_json, require_tokenizer, weight_files)

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
    source: str | None = None  # a single file or folder replacing the model folder's, or the built-in config

    def line(self) -> str:
        if not self.ok:
            return f"{self.name:<13} FAIL  {self.problem}"
        where = f" ({self.source})" if self.source else ""
        if not self.files:
            return f"{self.name:<13} ok{where}"
        return (f"{self.name:<13} ok    {self.files} file(s), {self.parameters:,} parameters, "
                f"{'/'.join(self.dtypes)}, {human_bytes(self.bytes)}{where}")


def gguf_report(model_path: Path, name: str) -> ComponentReport:
    """The report of a GGUF file standing in for a folder component: names and shapes checked against the config,
    types and sizes as stored."""
    comp = checked(ModelFiles(folder=model_path), name)
    infos = [info for _, info in comp.header.values()]
    return ComponentReport(name, True, files=1, parameters=sum(i.numel for i in infos),
                           dtypes=sorted({i.dtype for i in infos}), bytes=sum(i.nbytes for i in infos))


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
        if find_gguf(folder, WEIGHT_STEMS[name]) is not None:
            return gguf_report(model_path, name)
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


def source_report(files: ModelFiles, name: str) -> ComponentReport:
    """The report of one component of a run mixing single files and a folder; never raises."""
    try:
        if name == "scheduler":
            path = files.config_path("scheduler")
            scheduler_config(files)
            return ComponentReport(name, True, source=None if path and path.is_file() else "built-in published config")
        if name == "tokenizer":
            require_tokenizer(files.tokenizer_dir())
            return ComponentReport(name, True, source=str(files.tokenizer) if files.tokenizer else None)
        if files.file(name) is None and files.folder is not None:
            return check_component(files.folder, name)
        comp = checked(files, name)
        infos = [info for _, info in comp.header.values()]
        return ComponentReport(name, True, files=1, parameters=sum(i.numel for i in infos),
                               dtypes=sorted({i.dtype for i in infos}), bytes=sum(i.nbytes for i in infos),
                               source=str(files.file(name)))
    except (UsageError, WeightsError) as e:
        return ComponentReport(name, False, problem=one_line(e))
    except Exception as e:  # unforeseen: still one line for this component
        return ComponentReport(name, False, problem=f"{type(e).__name__}: {one_line(e)}")


def check_sources(files: ModelFiles) -> list[ComponentReport]:
    """check_model for a folder alone; with single files or a tokenizer folder, one report per component from
    wherever it comes (a file's names and shapes are checked in the layout it uses)."""
    if not files.single_files and files.tokenizer is None:
        return check_model(files.folder)
    return [source_report(files, name) for name in COMPONENTS]
