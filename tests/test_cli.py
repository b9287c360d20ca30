"""The command line as a new user meets it: help that reads like a well-kept CLI, `--version`, `python -m zimage`,
`check DIR`, and a start-up that loads torch only when there is work for it.

Help and start-up are checked on the real command in a subprocess (`python -m zimage`), where what gets imported
and what the terminal shows are the point; the rest runs in-process with CliRunner on tiny checkpoints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from zimage.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
PANELS = ["Prompts", "Image", "Sampling", "Output", "Model files", "Device and memory", "Batch"]
HEAVY = {"torch", "transformers", "numpy", "PIL", "safetensors", "diffusers"}


def zimage(*args: str, cwd: Path | None = None, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python [PYTHON...] -m zimage ARGS` with a wide terminal, so that help lines do not wrap."""
    env = {**os.environ, "TERMINAL_WIDTH": "200", "COLUMNS": "200"}
    return subprocess.run([sys.executable, *python, "-m", "zimage", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def imported(result: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages imported by a run under `python -X importtime` (its report is on stderr)."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", result.stderr, flags=re.M)
    assert names, result.stderr  # the report is there at all
    return {n.split(".")[0] for n in names}


# ------------------------------------------------------------------------------------------------------- help

def test_generate_help_groups_the_flags_and_shows_their_defaults():
    result = zimage("generate", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "<bool>" not in out  # on/off flags are flags: `--json true` must not look valid
    assert re.search(r"--json\s+Print one JSON", out), out
    positions = [out.find(f"─ {panel} ─") for panel in PANELS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    for default in ["[default: weights/Z-Image-Turbo]", "[default: 1024]", "[default: 8]",
                    "[default: z_image_output.png]", "[default: (random, printed)]", "[default: auto]"]:
        assert default in out, default
    assert re.search(r"Usage: python -m zimage generate \[OPTIONS\]\s*$", out, flags=re.M), out


@pytest.mark.parametrize("command, usage", [("make-tiny", "make-tiny [OPTIONS] DIR"), ("check", "check [OPTIONS] [DIR]")])
def test_usage_names_folders_dir(command, usage):
    result = zimage(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: python -m zimage {usage}" in result.stdout
    assert "{" not in result.stdout and "<bool>" not in result.stdout


def test_every_generate_flag_is_in_the_readme():
    readme = README.read_text()
    command = typer.main.get_command(app).commands["generate"]
    flags = [opt for p in command.params for opt in p.opts if opt.startswith("--")]
    assert len(flags) > 20
    missing = [flag for flag in flags if f"`{flag}" not in readme]
    assert not missing, f"flags of `zimage generate --help` the README does not describe: {missing}"


def test_version_and_python_dash_m():
    result = zimage("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"zimage {version('zimage')}\n"
    assert "generate" in zimage("--help").stdout


# -------------------------------------------------------------------------------------------------- check DIR

def test_check_takes_the_folder_as_an_argument_or_with_model_path(tiny, tmp_path):
    runner = CliRunner()
    for args in (["check", str(tiny)], ["check", "--model-path", str(tiny)], ["check", str(tiny), "--model-path",
                                                                            str(tiny)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout.splitlines()[-1] == "all good"
    result = runner.invoke(app, ["check", str(tiny), "--model-path", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: two folders given") and result.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ start-up

@pytest.mark.parametrize("args", [
    ["--help"],
    ["--version"],
    ["generate", "--help"],
    ["generate", "-p", "a cat", "--width", "1000"],
    ["generate", "-p", "a cat", "-o", "out/{foo}.png"],
    ["generate", "-p", "a cat", "--model-path", "no/such/folder"],
], ids=["help", "version", "generate-help", "bad-size", "bad-template", "no-model"])
def test_help_and_usage_errors_do_not_import_torch(tmp_path, args):
    """`--help` and usage errors are answered without importing torch, transformers, numpy or PIL (seconds of
    start-up that scripts calling zimage many times pay on every call)."""
    result = zimage(*args, cwd=tmp_path, python=("-X", "importtime"))
    assert result.returncode == (0 if "--help" in args or "--version" in args else 2), result.stderr[-2000:]
    assert not imported(result) & HEAVY, sorted(imported(result) & HEAVY)
    assert list(tmp_path.iterdir()) == []
