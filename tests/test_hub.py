"""`--model-path org/name` and the default model path find snapshots in the local Hugging Face cache, laid out as
huggingface_hub lays it out (models--org--name/blobs, refs/main, snapshots/<commit>/ symlinks into blobs), with
HF_HUB_OFFLINE=1 and without the network; a model that is not cached is one line with the download command."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from zimage.cli import app
from zimage.images import read_settings
from zimage.tiny import TinySpec, make_tiny

ZIMAGE = Path(sys.executable).parent / "zimage"
SMALL = ["-p", "a cat", "--width", "64", "--height", "64", "--num-steps", "2", "--seed", "9", "-q"]
REPO = "Tongyi-MAI/Z-Image-Turbo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put `folder` into a hub cache as huggingface_hub stores a downloaded snapshot: each file once as a blob
    named by its hash, the snapshot's files as relative symlinks to the blobs, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub uses in this process, and a working folder without weights/."""
    from huggingface_hub import constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return root


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def generate(*args: str):
    return CliRunner().invoke(app, ["generate", *SMALL, *args])


def test_the_fake_cache_is_what_huggingface_hub_reads(tiny, cache):
    from huggingface_hub import scan_cache_dir

    add_to_cache(cache, REPO, tiny)
    [repo] = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and [r.commit_hash for r in repo.revisions] == [COMMIT]
    assert {r.refs for r in repo.revisions} == {frozenset({"main"})}


def test_model_path_repo_id_uses_the_cached_snapshot(tiny, cache, tmp_path):
    add_to_cache(cache, "someone/z-image-copy", tiny)
    assert generate("--model-path", str(tiny), "-o", str(tmp_path / "folder.png")).exit_code == 0
    result = generate("--model-path", "someone/z-image-copy", "-o", str(tmp_path / "cached.png"))
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "cached.png"))
    snapshot = cache / "models--someone--z-image-copy" / "snapshots" / COMMIT
    assert read_settings(tmp_path / "cached.png")["model_path"] == str(snapshot)  # what --from-png re-runs


def test_default_model_path_falls_back_to_the_cache(checkpoints, cache, tmp_path):
    add_to_cache(cache, REPO, checkpoints["single"])
    result = generate("-o", str(tmp_path / "default.png"))
    assert result.exit_code == 0, result.output
    assert generate("--model-path", str(checkpoints["single"]), "-o", str(tmp_path / "folder.png")).exit_code == 0
    assert np.array_equal(pixels(tmp_path / "default.png"), pixels(tmp_path / "folder.png"))


def test_default_model_path_prefers_the_weights_folder(checkpoints, cache, tmp_path):
    """weights/Z-Image-Turbo wins over the cache: the cache holds another model, whose image would differ."""
    add_to_cache(cache, REPO, checkpoints["wide"])
    shutil.copytree(checkpoints["single"], Path("weights") / "Z-Image-Turbo")
    assert generate("-o", str(tmp_path / "default.png")).exit_code == 0
    assert generate("--model-path", str(checkpoints["single"]), "-o", str(tmp_path / "folder.png")).exit_code == 0
    assert np.array_equal(pixels(tmp_path / "default.png"), pixels(tmp_path / "folder.png"))


def test_check_accepts_a_repo_id(tiny, cache):
    add_to_cache(cache, REPO, tiny)
    result = CliRunner().invoke(app, ["check", "--model-path", REPO])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("all good")


def test_uncached_repo_id_is_one_line_with_the_download_command(cache, tmp_path):
    add_to_cache(cache, "someone/other-model", make_tiny(tmp_path / "other", TinySpec()))
    before = sorted(tmp_path.rglob("*"))
    result = generate("--model-path", "someone/missing-model", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "someone/missing-model" in lines[0] and str(cache) in lines[0]
    assert lines[0].endswith("download it with: hf download someone/missing-model")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_the_cache_location_follows_the_environment(tiny, tmp_path, variable):
    """A fresh process reads HF_HOME (cache in HF_HOME/hub) or HF_HUB_CACHE, as huggingface_hub does; offline."""
    root = tmp_path / "home"
    add_to_cache(root / "hub" if variable == "HF_HOME" else root, REPO, tiny)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update({variable: str(root), "HF_HUB_OFFLINE": "1"})
    out = tmp_path / "x.png"
    result = subprocess.run([str(ZIMAGE), "generate", *SMALL, "--model-path", REPO, "-o", str(out)], env=env,
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_check_with_an_uncached_repo_id_is_one_line(cache):
    result = CliRunner().invoke(app, ["check", "--model-path", "someone/missing-model"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: someone/missing-model is not a folder here, nor a model in the Hugging Face cache ({cache}); "
        "download it with: hf download someone/missing-model"]
