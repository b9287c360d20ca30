"""Many prompts, many images: prompt files, seeds, batching, output names, metadata and --json."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import zimage.pipeline
from zimage.cli import app

SMALL = ["--width", "64", "--height", "64", "-q", "--dtype", "float32"]  # float32: --dtype auto may pick bfloat16


def run(tiny, *args, input=None):
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), *SMALL, *args], input=input)
    return result


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_text_file_gives_one_numbered_image_per_prompt(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na cat\n\n  a dog  \n# another\na bird\n")
    result = run(tiny, "--prompts-file", str(prompts), "--seed", "10", "--output", str(tmp_path / "out" / "img.png"))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["img-0000.png", "img-0001.png", "img-0002.png"]
    metas = [json.loads(Image.open(tmp_path / "out" / n).info["zimage"]) for n in names]
    assert [m["prompt"] for m in metas] == ["a cat", "a dog", "a bird"]
    assert [m["seed"] for m in metas] == [10, 11, 12]


def test_jsonl_fields_override_the_command_line(tiny, tmp_path):
    lines = [
        {"prompt": "a cat"},
        {"prompt": "a dog", "seed": 99, "width": 96, "output": str(tmp_path / "dog.png")},
        {"prompt": "a bird", "negative_prompt": "blurry", "num_steps": 3},
        {"prompt": "a fish", "guidance_scale": 2.5, "height": 32},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = run(tiny, "--prompts-file", str(jsonl), "--seed", "5", "--output", str(tmp_path / "{index:03d}.png"))
    assert result.exit_code == 0, result.output
    cat, bird, fish = (json.loads(Image.open(tmp_path / f"{i:03d}.png").info["zimage"]) for i in (0, 2, 3))
    dog = json.loads(Image.open(tmp_path / "dog.png").info["zimage"])
    assert (cat["seed"], cat["width"], cat["guidance"]) == (5, 64, 0.0)
    assert (dog["seed"], dog["width"], dog["height"]) == (99, 96, 64)
    assert Image.open(tmp_path / "dog.png").size == (96, 64)
    assert (bird["negative_prompt"], bird["guidance"], bird["steps"], bird["seed"]) == ("blurry", 5.0, 3, 7)
    assert (fish["guidance"], fish["height"]) == (2.5, 32)


def test_prompts_from_stdin(tiny, tmp_path):
    result = run(tiny, "--prompts-file", "-", "--seed", "1", "--output", str(tmp_path / "s-{seed}-{prompt}.png"),
                 input="a red car\na blue boat\n")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-1-a-red-car.png", "s-2-a-blue-boat.png"]


def test_jsonl_from_stdin(tiny, tmp_path):
    lines = '{"prompt": "a kite", "seed": 3}\n{"prompt": "a drum", "output": "%s"}\n' % (tmp_path / "drum.png")
    result = run(tiny, "--prompts-file", "-", "--output", str(tmp_path / "k.png"), input=lines)
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(tmp_path / "k-0000.png").info["zimage"])["seed"] == 3
    assert (tmp_path / "drum.png").is_file()


def test_num_images_uses_consecutive_seeds_reproducible_alone(tiny, tmp_path):
    result = run(tiny, "--prompt", "a tree", "--num-images", "3", "--seed", "40", "--output", str(tmp_path / "t.png"))
    assert result.exit_code == 0, result.output
    alone = run(tiny, "--prompt", "a tree", "--seed", "42", "--output", str(tmp_path / "alone.png"))
    assert alone.exit_code == 0, alone.output
    assert np.abs(pixels(tmp_path / "t-0002.png") - pixels(tmp_path / "alone.png")).max() <= 2
    assert np.abs(pixels(tmp_path / "t-0000.png") - pixels(tmp_path / "t-0001.png")).max() > 2


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_images_equal_those_made_one_at_a_time(tiny, tmp_path, batch_size):
    prompts = ["a cat", "an old lighthouse on a cliff at night, stormy sea", "a bowl of fruit"]
    args = [a for p in prompts for a in ("--prompt", p)]
    result = run(tiny, *args, "--seed", "3", "--batch-size", str(batch_size), "--negative-prompt", "ugly",
                 "--output", str(tmp_path / "b{index}.png"))
    assert result.exit_code == 0, result.output
    for k, prompt in enumerate(prompts):
        single = tmp_path / f"single{k}.png"
        assert run(tiny, "--prompt", prompt, "--seed", str(3 + k), "--negative-prompt", "ugly",
                   "--output", str(single)).exit_code == 0
        assert np.abs(pixels(tmp_path / f"b{k}.png") - pixels(single)).max() <= 2


def test_metadata_round_trips_through_from_png(tiny, tmp_path):
    first = tmp_path / "first.png"
    result = run(tiny, "--prompt", "a castle", "--negative-prompt", "fog", "--guidance-scale", "3.5",
                 "--num-steps", "5", "--seed", "77", "--output", str(first))
    assert result.exit_code == 0, result.output
    info = Image.open(first).info
    assert "a castle\nNegative prompt: fog\nSteps: 5" in info["parameters"]
    assert "Seed: 77, Size: 64x64" in info["parameters"]
    again = tmp_path / "again.png"
    result = CliRunner().invoke(app, ["generate", "--from-png", str(first), "--output", str(again), "-q",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(first), pixels(again))
    assert json.loads(Image.open(again).info["zimage"]) == json.loads(info["zimage"])
    other = tmp_path / "other.png"
    result = CliRunner().invoke(app, ["generate", "--from-png", str(first), "--seed", "78", "--output", str(other),
                                      "-q"])
    assert result.exit_code == 0
    assert json.loads(Image.open(other).info["zimage"])["seed"] == 78


def test_models_are_loaded_once_and_text_encoder_freed_before_transformer(tiny, tmp_path, monkeypatch):
    events = []
    encoders = []
    load_te, load_tr, load_vae = (zimage.pipeline.TextEncoder.load, zimage.pipeline.load_transformer,
                                  zimage.pipeline.load_vae)

    def te(*a, **k):
        enc = load_te(*a, **k)
        encoders.append(weakref.ref(enc.model))
        events.append("text_encoder")
        return enc

    def tr(*a, **k):
        events.append(("transformer", all(ref() is None for ref in encoders)))
        return load_tr(*a, **k)

    def vae(*a, **k):
        events.append("vae")
        return load_vae(*a, **k)

    monkeypatch.setattr(zimage.pipeline.TextEncoder, "load", te)
    monkeypatch.setattr(zimage.pipeline, "load_transformer", tr)
    monkeypatch.setattr(zimage.pipeline, "load_vae", vae)
    result = run(tiny, "--prompt", "a", "--prompt", "b", "--num-images", "3", "--negative-prompt", "c",
                 "--output", str(tmp_path / "m.png"))
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("m-*.png"))) == 6
    assert events == ["text_encoder", ("transformer", True), "vae"]


def test_json_lists_every_file_and_nothing_else_on_stdout(tiny, tmp_path):
    result = run(tiny, "--prompt", "a", "--prompt", "b", "--seed", "0", "--json", "--output",
                 str(tmp_path / "j{index}.png"))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(tmp_path / "j0.png"), str(tmp_path / "j1.png")]
    assert {"prompt", "seed", "width", "height", "steps", "guidance", "seconds"} <= set(records[0])
    assert all((tmp_path / f"j{i}.png").is_file() for i in range(2))


def test_bad_lines_are_reported_and_skipped(tiny, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ok one"}\n{"prompt": oops}\n{"prompt": "bad size", "width": 100}\n'
                     '{"prompt": "ok two"}\n')
    result = run(tiny, "--prompts-file", str(jsonl), "--output", str(tmp_path / "o{index}.png"))
    assert result.exit_code == 1
    assert "p.jsonl line 2: not valid JSON" in result.stderr
    assert "p.jsonl line 3: 100x64" in result.stderr and "Try 96x64 or 112x64" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("o*.png")) == ["o0.png", "o1.png"]  # the bad line takes no index


def test_jpeg_and_webp_outputs_carry_settings(tiny, tmp_path):
    for name in ("a.jpg", "b.webp"):
        result = run(tiny, "--prompt", "a hill", "--seed", "4", "--output", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        im = Image.open(tmp_path / name)
        assert im.format in ("JPEG", "WEBP")
        assert json.loads(im.getexif()[0x9286])["seed"] == 4
