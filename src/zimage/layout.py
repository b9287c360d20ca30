"""Where a checkpoint is looked for, and what to say when it is not there (no torch: usage errors stay fast)."""

from __future__ import annotations

from pathlib import Path

from .errors import MissingFileError, UsageError

DEFAULT_MODEL = Path("weights/Z-Image-Turbo")
# huggingface_hub 1.0 replaced the huggingface-cli command with hf
DOWNLOAD_HINT = "hf download Tongyi-MAI/Z-Image-Turbo --local-dir weights/Z-Image-Turbo"


def is_default(model_path: Path) -> bool:
    return model_path.absolute() == DEFAULT_MODEL.absolute()


def missing_hint(e: MissingFileError, model_path: Path) -> str:
    """The message for a file missing from `model_path`, with the download command when that is the default folder
    (where the published checkpoint belongs; a custom folder may hold anything, so no command fits it)."""
    if is_default(model_path):
        return f"{e}. Download the model with: {DOWNLOAD_HINT}"
    return str(e)


def require_folder(model_path: Path) -> None:
    """Fail unless `model_path` is a folder: MissingFileError when it does not exist, UsageError when it is a file."""
    if model_path.is_file():
        raise UsageError(f"model path {model_path} is a file, not a folder; give the checkpoint folder "
                         "(the one holding model_index.json)")
    if not model_path.is_dir():
        raise MissingFileError(f"model folder {model_path} not found")
