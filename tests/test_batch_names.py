"""Rough edges of batch runs: JSONL found by content, file names from prompts in any script, numbering when a
template does not make names unique, and bad lines that leave no gap in {index} and are reported in order."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from zimage.cli import app
from zimage.jobs import slug

SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "5"]


def generate(model, *args, input=None):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), *SMALL, *args], input=input)


def stored(path) -> dict:
    return json.loads(Image.open(path).info["zimage"])


def test_jsonl_file_is_read_as_jsonl_whatever_its_name(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('# objects\n{"prompt": "a kite", "seed": 40}\n{"prompt": "a drum", "num_steps": 3}\n')
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(tmp_path / "{index}.png"))
    assert result.exit_code == 0, result.stderr
    assert (stored(tmp_path / "0.png")["prompt"], stored(tmp_path / "0.png")["seed"]) == ("a kite", 40)
    assert (stored(tmp_path / "1.png")["prompt"], stored(tmp_path / "1.png")["steps"]) == ("a drum", 3)


@pytest.mark.parametrize("prompt, name", [
    ("A red Car!", "a-red-car"),
    ("一只猫在屋顶上", "一只猫在屋顶上"),
    ("кошка на крыше", "кошка-на-крыше"),
    ("🐱 + 🐶", "🐱-🐶"),
    ("नमस्ते दुनिया", "नमस्ते-दुनिया"),  # combining vowel signs stay with their letters
    ('a<b>c:d"e/f\\g|h?i*j', "a-b-c-d-e-f-g-h-i-j"),  # every character Windows reserves
    ("con", "con_"),
    ("Lpt1", "lpt1_"),
    ("...", "image"),
])
def test_slug_keeps_every_script_and_is_safe_everywhere(prompt, name):
    assert slug(prompt) == name


def test_slug_is_cut_by_bytes_on_a_character_boundary():
    s = slug("猫" * 100)
    assert s == "猫" * 40 and len(s.encode()) == 120
    s = slug("🐱" * 100)
    assert s == "🐱" * 30 and len(s.encode()) == 120


def test_prompts_in_other_scripts_get_their_own_files(tiny, tmp_path):
    result = generate(tiny, "-p", "一只猫", "-p", "一只狗", "-p", "🐱", "-o", str(tmp_path / "{prompt}.png"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["一只猫.png", "一只狗.png", "🐱.png"])


def test_template_that_repeats_a_name_is_numbered(tiny, tmp_path):
    result = generate(tiny, "-p", "a cat", "-n", "3", "-o", str(tmp_path / "{prompt}.png"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cat-0000.png", "a-cat-0001.png", "a-cat-0002.png"]


def test_template_that_names_each_image_is_not_numbered(tiny, tmp_path):
    result = generate(tiny, "-p", "a cat", "-n", "2", "-o", str(tmp_path / "{prompt}-{seed}.png"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cat-5.png", "a-cat-6.png"]


def test_bad_lines_leave_no_gap_and_are_reported_in_line_order(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "bad size", "width": 100}\n{"prompt": oops}\n'
                       '{"prompt": "two"}\n{"prompt": "bad steps", "num_steps": 0}\n{"prompt": "three"}\n')
    out = tmp_path / "out"
    result = generate(tiny, "--prompts-file", str(prompts), "-o", str(out / "{index}.png"))
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("skipped:")]
    assert [ln.split(":")[1].strip() for ln in lines] == ["p.jsonl line 2", "p.jsonl line 3", "p.jsonl line 5"]
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]
    assert [(stored(out / f"{i}.png")["prompt"], stored(out / f"{i}.png")["seed"]) for i in range(3)] == \
        [("one", 5), ("two", 6), ("three", 7)]
    assert "3 image(s) written, 0 skipped, 3 failed" in result.stderr
