"""The command line as a new user meets it: help that reads like a well-kept CLI, `--version`, `python -m zimage`,
`check DIR`, and a start-up that loads torch only when there is work for it.

Help and start-up are checked on the real command in a subprocess (`python -m zimage`), where what gets imported
and what the terminal shows are the point; the rest runs in-process with CliRunner on tiny checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from zimage.cli import app
from zimage.images import read_settings

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


# ------------------------------------------------------------------------------------- first-hour mistakes

SMALL = ["--width", "64", "--height", "64", "--num-steps", "2"]


def generate(*args: str):
    return CliRunner().invoke(app, ["generate", *args])


def one_error_line(result, code: int, *phrases: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def test_from_png_finds_a_relative_model_path_from_another_folder(tiny, tmp_path, monkeypatch):
    """The PNG stores the model folder's absolute path (and the path as typed, for the record)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = os.path.relpath(tiny, tmp_path / "a")
    first = generate("--model-path", relative, "-p", "a cat", *SMALL, "--seed", "3", "-q", "-o", "one.png")
    assert first.exit_code == 0, first.output
    meta = read_settings(tmp_path / "a" / "one.png")
    assert meta["model_path"] == str(tiny) and meta["model_path_given"] == relative
    monkeypatch.chdir(tmp_path / "b")
    again = generate("--from-png", str(tmp_path / "a" / "one.png"), "-q", "-o", "two.png")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "b" / "two.png").is_file()


def test_download_hint_only_for_the_default_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = one_error_line(generate("-p", "a cat", "--seed", "1"), 2, "weights/Z-Image-Turbo not found",
                             "hf download Tongyi-MAI/Z-Image-Turbo")
    assert "not found" in default
    custom = one_error_line(generate("-p", "a cat", "--model-path", "mine", "--seed", "1"), 2, "mine not found")
    assert "download" not in custom
    (tmp_path / "model.safetensors").write_bytes(b"")
    one_error_line(generate("-p", "a cat", "--model-path", "model.safetensors", "--seed", "1"), 2,
                   "model.safetensors is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_missing_model_stored_in_a_png_says_where_it_came_from(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    assert generate("--model-path", str(model), "-p", "a cat", *SMALL, "--seed", "1", "-q", "-o",
                    str(tmp_path / "a.png")).exit_code == 0
    shutil.rmtree(model)
    one_error_line(generate("--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png")), 2,
                   f"model folder {model} not found", f"stored in {tmp_path / 'a.png'}")


@pytest.mark.parametrize("template, phrase", [
    ("t/{foo}.png", "unknown placeholder {foo}; use {index}, {seed} or {prompt}"),
    ("t/{index:zz}.png", "bad output template 't/{index:zz}.png'"),
    ("t/{.png", "bad output template 't/{.png'"),
    ("t/}.png", "bad output template 't/}.png'"),
])
def test_bad_output_template_is_a_usage_error_before_loading(tiny, tmp_path, monkeypatch, template, phrase):
    monkeypatch.chdir(tmp_path)
    one_error_line(generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "-o", template), 2, phrase)
    assert list(tmp_path.iterdir()) == []


def test_seed_line_only_once_work_starts(tiny, tmp_path):
    """A usage error is the only line; a run without --seed says its seed."""
    one_error_line(generate("--model-path", str(tiny), "-p", "a cat", "--width", "1000"), 2, "multiples of 16")
    one_error_line(generate("--model-path", str(tmp_path / "none"), "-p", "a cat"), 2, "not found")
    result = generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^seed \d+ \(random; pass --seed \d+ to reproduce\)$", result.stderr, flags=re.M)


def test_quiet_prints_nothing_but_json_records(tiny, tmp_path):
    """-q: errors and warnings only on stderr; stdout holds --json records and nothing else."""
    quiet = generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "-q", "-o", str(tmp_path / "a.png"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == "" and quiet.stderr == ""
    records = generate("--model-path", str(tiny), "-p", "a cat", "-p", "a dog", *SMALL, "-q", "--json",
                       "-o", str(tmp_path / "b.png"))
    assert records.exit_code == 0, records.output
    assert records.stderr == ""
    assert [json.loads(line)["prompt"] for line in records.stdout.splitlines()] == ["a cat", "a dog"]
    loud = generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "--seed", "1", "-o", str(tmp_path / "c.png"))
    assert loud.stdout == "" and "Saved" in loud.stderr


def test_quoted_tilde_in_output_is_the_home_folder(tiny, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "--seed", "1", "-q", "-o", "~/pics/x.png")
    assert result.exit_code == 0, result.output
    assert (home / "pics" / "x.png").is_file()
    assert list(work.iterdir()) == []


def test_byte_order_mark_is_not_part_of_the_first_prompt(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa cat\na dog\n".encode("utf-8"))
    result = generate("--model-path", str(tiny), "--prompts-file", str(prompts), *SMALL, "--seed", "1", "-q",
                      "--json", "-o", str(tmp_path / "out" / "{index}.png"))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["a cat", "a dog"]


def test_prompts_file_that_is_a_folder(tiny, tmp_path):
    one_error_line(generate("--model-path", str(tiny), "--prompts-file", str(tmp_path)), 2,
                   f"prompts file {tmp_path} is a folder")


def test_cpu_and_another_device_conflict(tiny, tmp_path):
    one_error_line(generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "--cpu", "--device", "cuda",
                            "-o", str(tmp_path / "a.png")), 2, "--cpu and --device cuda conflict")
    assert list(tmp_path.iterdir()) == []


def test_options_that_do_nothing_here_say_so(tiny, tmp_path):
    result = generate("--model-path", str(tiny), "-p", "a cat", *SMALL, "--seed", "1", "--cpu", "-q",
                      "--offload", "sequential", "--cfg-truncation", "1.5", "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert "--offload sequential saves no memory on cpu" in lines[1] and "same image, slower" in lines[1]
    assert "--cfg-truncation 1.5 is above 1" in lines[0] and "the same as 1" in lines[0]


INTERRUPT_AT_TORCH = """
import runpy, sys


class CtrlC:  # Ctrl-C arriving while torch is imported, the longest part of start-up
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt


sys.meta_path.insert(0, CtrlC())
sys.argv = ["zimage", *sys.argv[1:]]
runpy.run_module("zimage", run_name="__main__")
"""


@pytest.mark.parametrize("command, line", [
    (["generate", "-p", "a cat", *SMALL], "interrupted before any image was written"),
    (["check"], "interrupted"),
])
def test_ctrl_c_during_start_up_exits_130_on_one_line(tiny, tmp_path, command, line):
    result = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH, *command, "--model-path", str(tiny)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [line]
    assert list(tmp_path.iterdir()) == []
