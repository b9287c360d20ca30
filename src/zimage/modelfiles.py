"""Where each part of the model comes from: the `--model-path` folder in the published layout, single files
(`--transformer`, `--text-encoder`, `--vae`), a `--tokenizer` folder, and the published configs built into zimage
for whatever no folder provides."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import published, singlefile
from .errors import UsageError
from .scheduler import SchedulerConfig
from .transformer import TransformerConfig
from .vae import VAEConfig
from .weights import (CONFIG_NAMES, WEIGHT_STEMS, MissingFileError, Piece, TensorInfo, WeightsError,
                      checkpoint_header, find_gguf, match_pieces, read_config, read_header,
                      require_tokenizer)

FILE_COMPONENTS = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class ModelFiles:
    """The sources of one run. `folder` is a checkpoint in the published layout (None: no folder); a file named
    for a component replaces that component's weights in the folder, and `tokenizer` the folder's tokenizer."""

    folder: Path | None = None
    transformer: Path | None = None
    text_encoder: Path | None = None
    vae: Path | None = None
    tokenizer: Path | None = None

    @classmethod
    def of(cls, source: "ModelFiles | Path | str") -> "ModelFiles":
        """`source` itself, or a ModelFiles for the folder it names."""
        return source if isinstance(source, ModelFiles) else cls(folder=Path(source))

    def file(self, component: str) -> Path | None:
        return getattr(self, component) if component in FILE_COMPONENTS else None

    @property
    def single_files(self) -> bool:
        return any(self.file(c) for c in FILE_COMPONENTS)

    def config_path(self, component: str) -> Path | None:
        """The folder's config of `component`. None means the published config: there is no folder, or the folder
        lacks it and the component is a single file or the scheduler. A folder component's config stays required."""
        if self.folder is None:
            return None
        path = self.folder / component / CONFIG_NAMES[component]
        if path.is_file():
            return path
        return None if self.file(component) or component == "scheduler" else path

    def tokenizer_dir(self) -> Path:
        """The tokenizer folder: `tokenizer`, else the folder's `tokenizer/`; a UsageError says what to give."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.folder is not None and (self.folder / "tokenizer").is_dir():
            return self.folder / "tokenizer"
        where = f"{self.folder} has no tokenizer/ folder" if self.folder else "no --model-path folder was found"
        raise UsageError(f"no tokenizer: {where}; give --model-path with the published layout, or --tokenizer DIR "
                         "(a folder with tokenizer_config.json and tokenizer.json)")


@dataclass(frozen=True)
class Component:
    """A weights component ready to build and fill: its config, the tensors on disk, and which of them fills
    each module key. `configured_by` and `where` name the config and the files in messages."""

    config: Any
    header: dict[str, tuple[Path, TensorInfo]]
    pieces: dict[str, Piece]
    configured_by: str
    where: Path


def scheduler_config(files: ModelFiles) -> SchedulerConfig:
    path = files.config_path("scheduler")
    if path is None or not path.is_file():
        return SchedulerConfig.from_dict(published.SCHEDULER, "the published scheduler config")
    return read_config(SchedulerConfig.from_json, path)


def base_config(files: ModelFiles, component: str) -> tuple[Any, str]:
    """The config a component starts from (its folder's, else the published one) and how to name it."""
    path = files.config_path(component)
    if component == "text_encoder":
        from transformers import AutoConfig, Qwen3Config

        if path is None:
            return Qwen3Config(**published.TEXT_ENCODER), "the published Qwen3-4B config"
        try:
            return AutoConfig.from_pretrained(str(path.parent)), str(path)
        except Exception as e:  # transformers raises OSError, ValueError or its own errors for a bad config
            raise WeightsError(f"{path}: {' '.join(str(e).split())}") from None
    cls = TransformerConfig if component == "transformer" else VAEConfig
    if path is None:
        return cls.from_dict(published.CONFIGS[component]), f"the published {component} config"
    return read_config(cls.from_json, path), str(path)


def file_header(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    return {name: (path, info) for name, info in read_header(path).items()}


def with_shapes(component: str, base: Any, shapes: dict[str, tuple[int, ...]], path: Path) -> Any:
    """`base` completed with what a single file's shapes show; an error names what must be given instead."""
    try:
        if component == "transformer":
            return singlefile.infer_transformer(shapes, base)
        if component == "vae":
            return singlefile.infer_vae(shapes, base)
        from transformers import Qwen3Config

        values = {k: v for k, v in base.to_dict().items() if k not in ("layer_types", "max_window_layers")}
        values.update(singlefile.infer_text_encoder(shapes))
        for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # unused here; must fit a smaller vocabulary
            if isinstance(values.get(special), int) and values[special] >= values["vocab_size"]:
                values[special] = None
        return Qwen3Config(**values)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: its shapes do not fit the rest of the config ({' '.join(str(e).split())}); "
                           f"give --model-path with the {component}/config.json that fits it") from None


def no_component(name: str) -> UsageError:
    return UsageError(f"no {name.replace('_', ' ')}: give --model-path FOLDER or {singlefile.FLAGS[name]} FILE")


def gguf_source(files: ModelFiles, name: str) -> Path | None:
    """The GGUF file a component comes from: its single file when that is a .gguf, else a .gguf standing in for the
    safetensors in its folder; None for safetensors."""
    path = files.file(name)
    if path is not None:
        return path if path.suffix.lower() == ".gguf" else None
    if files.folder is None or name not in WEIGHT_STEMS:
        return None
    return find_gguf(files.folder / name, WEIGHT_STEMS[name])


def weights_header(files: ModelFiles, name: str) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a component's weights, from its single file or its folder, without configs or mapping."""
    if (gguf := gguf_source(files, name)) is not None:
        from .gguf import gguf_header

        return gguf_header(gguf, name)
    path = files.file(name)
    if path is not None:
        return file_header(path)
    if files.folder is None:
        raise no_component(name)
    return checkpoint_header(files.folder / name, WEIGHT_STEMS[name])


def component(files: ModelFiles, name: str) -> Component:
    """The config, tensors and key mapping of the transformer, text_encoder or vae, from its single file when one
    is given (keys mapped from any layout it is in, sizes read from its shapes) or from the folder."""
    path = files.file(name)
    if (gguf := gguf_source(files, name)) is not None:
        return gguf_component(files, name, gguf)
    if path is None:
        if files.folder is None:
            raise no_component(name)
        folder = files.folder / name
        header = checkpoint_header(folder, WEIGHT_STEMS[name])
        rename = singlefile.text_encoder_pieces_of if name == "text_encoder" else (lambda n: {n: Piece(n)})
        found = {k: p for n in header for k, p in rename(n).items()}
        config, configured_by = base_config(files, name)
        return Component(config, header, found, configured_by, folder)
    if not path.is_file():
        raise UsageError(f"{singlefile.FLAGS[name]}: no such file {path}")
    header = file_header(path)
    infos = {n: info for n, (_, info) in header.items()}
    if problem := singlefile.fit_problem(name, infos, str(path)):
        raise UsageError(problem)
    found = singlefile.pieces(name, infos)
    base, configured_by = base_config(files, name)
    config = with_shapes(name, base, singlefile.piece_shapes(infos, found), path)
    return Component(config, header, found, f"{configured_by} and the shapes in {path.name}", path)


def gguf_component(files: ModelFiles, name: str, path: Path) -> Component:
    """A component from a GGUF file (the transformer in the original layout, the text encoder in llama.cpp's
    names), configured like a single file: the folder's config, else the published one completed by its shapes."""
    from .gguf import gguf_header, pieces_of

    if not path.is_file():
        raise UsageError(f"{singlefile.FLAGS[name]}: no such file {path}")
    header = gguf_header(path, name)
    infos = {n: info for n, (_, info) in header.items()}
    of = pieces_of(name)
    found = {k: p for n in header for k, p in of(n).items()}
    base, configured_by = base_config(files, name)
    config = with_shapes(name, base, singlefile.piece_shapes(infos, found), path)
    return Component(config, header, found, f"{configured_by} and the shapes in {path.name}", path)


def require_sources(files: ModelFiles) -> None:
    """Fail with the first missing part of a run mixing single files and a folder: the tokenizer, and the folder
    weights of each component not given as a file."""
    require_tokenizer(files.tokenizer_dir())
    for name in FILE_COMPONENTS:
        if files.file(name) is None:
            if files.folder is None or not files.folder.is_dir():
                where = f"{files.folder} not found" if files.folder else "no --model-path folder"
                raise MissingFileError(f"{where} for the {name.replace('_', ' ')} (or give {singlefile.FLAGS[name]}"
                                       " FILE)")
            if gguf_source(files, name) is None:
                checkpoint_header(files.folder / name, WEIGHT_STEMS[name])


def tokenizer_folder(given: Path) -> Path:
    """`--tokenizer`: a folder, or `org/name` of a model in the Hugging Face cache (its `tokenizer/`, else its root)."""
    from .hub import cached_snapshot, looks_like_repo_id

    if given.is_dir() or not looks_like_repo_id(str(given)):
        if not given.is_dir():
            raise UsageError(f"--tokenizer: no such folder {given}")
        return given
    snapshot = cached_snapshot(str(given))
    if snapshot is None:
        raise UsageError(f"--tokenizer: {given} is not a folder here, nor a model in the Hugging Face cache")
    return snapshot / "tokenizer" if (snapshot / "tokenizer").is_dir() else snapshot


def sources(folder: Path, explicit: bool, transformer: Path | None = None, text_encoder: Path | None = None,
            vae: Path | None = None, tokenizer: Path | None = None) -> ModelFiles:
    """The ModelFiles of a run: `folder` alone when no file is named; else the named files over `folder`, which
    is dropped when it was not `explicit`ly given and does not exist (the published configs stand in)."""
    tok = tokenizer_folder(tokenizer) if tokenizer is not None else None
    named = ModelFiles(None, transformer, text_encoder, vae, tok)
    if not named.single_files and tok is None:
        return ModelFiles(folder)
    if folder.is_dir():
        return replace(named, folder=folder)
    if explicit:
        raise MissingFileError(f"model folder {folder} not found")
    return named


def expected(name: str, config: Any) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a component built from `config` on the meta device (no memory, no data)."""
    import torch

    from .transformer import ZImageTransformer
    from .vae import AutoencoderKL
    from .weights import expected_shapes

    with torch.device("meta"):
        if name == "transformer":
            return expected_shapes(ZImageTransformer(config))
        if name == "vae":
            return expected_shapes(AutoencoderKL(config))
        from transformers import Qwen3Model

        return expected_shapes(Qwen3Model(config))


def checked(files: ModelFiles, name: str) -> Component:
    """`component`, with every tensor's name and shape checked against the model its config describes."""
    comp = component(files, name)
    try:
        shapes = expected(name, comp.config)
    except Exception as e:  # a config whose values cannot build the model
        raise WeightsError(f"{comp.configured_by}: {' '.join(str(e).split())}") from None
    match_pieces(comp.header, shapes, comp.pieces, comp.configured_by, comp.where)
    return comp
