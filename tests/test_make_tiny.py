"""`zimage make-tiny` replaces only what it wrote itself: never a real download, never a file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from zimage.cli import app
from zimage.tiny import MARKER


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def make_tiny(*args: str):
    return CliRunner().invoke(app, ["make-tiny", *args])


def test_refuses_a_real_checkpoint_folder_and_touches_nothing(tmp_path):
    real = tmp_path / "Z-Image-Turbo"
    (real / "transformer").mkdir(parents=True)
    (real / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    (real / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"precious" * 1000)
    before = tree_digest(real)
    result = make_tiny(str(real))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "refusing to replace" in result.output
    assert tree_digest(real) == before


def test_refuses_an_existing_file_with_one_line(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"data")
    result = make_tiny(str(target))
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    assert "not a folder" in result.output
    assert target.read_bytes() == b"data"


def test_replaces_its_own_tiny_checkpoint_and_an_empty_folder(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()  # empty: fine
    assert make_tiny(str(out)).exit_code == 0
    assert (out / MARKER).is_file() and (out / "model_index.json").is_file()
    (out / "stale.txt").write_text("left by an earlier run")
    assert make_tiny(str(out), "--seed", "3").exit_code == 0  # marked: replaced whole
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()


def test_marker_removed_means_not_replaceable(tmp_path):
    out = tmp_path / "tiny"
    assert make_tiny(str(out)).exit_code == 0
    (out / MARKER).unlink()
    before = tree_digest(out)
    assert make_tiny(str(out)).exit_code == 2
    assert tree_digest(out) == before
