"""`--model-path org/name`: the snapshot of a Hugging Face repository already in the local cache (HF_HOME,
HF_HUB_CACHE), found through huggingface_hub's own cache lookup and never over the network."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError
from .published import REPO_ID

REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def download_command(repo_id: str) -> str:
    return f"hf download {repo_id}"


def looks_like_repo_id(text: str) -> bool:
    """`org/name` that is not a path to something here: no other slashes, and no folder named like its org."""
    return bool(REPO_ID_PATTERN.fullmatch(text)) and not Path(text.split("/")[0]).is_dir()


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id`'s main revision, or None when it is not in the cache. A snapshot that
    huggingface_hub knows to be incomplete is a UsageError saying how to complete it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))  # local_files_only: never the network
    except IncompleteSnapshotError as e:
        raise UsageError(f"the cached snapshot of {repo_id} in {cache_dir()} is incomplete ({e}); complete it "
                         f"with: {download_command(repo_id)}") from None
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def resolve_model_path(given: str | None, default: Path) -> Path:
    """The checkpoint folder for `--model-path`.

    A path that exists wins; `org/name` is looked up in the Hugging Face cache and is an error with the download
    command when absent; without `given`, `default` is tried, then the published model in the cache, and `default`
    is returned (for the usual missing-folder message) when neither is there."""
    if given is None:
        if default.is_dir():
            return default
        return cached_snapshot(REPO_ID) or default
    if Path(given).exists() or not looks_like_repo_id(given):
        return Path(given)
    snapshot = cached_snapshot(given)
    if snapshot is None:
        raise UsageError(f"{given} is not a folder here, nor a model in the Hugging Face cache ({cache_dir()}); "
                         f"download it with: {download_command(given)}")
    return snapshot
