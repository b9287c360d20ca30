"""`zimage check --model-path DIR`: layout, configs, index entries, safetensors headers and tensor shapes, checked
without reading tensor data; one line per component, exit 0 only when all is well, --json for scripts."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import zimage.weights
from zimage.cli import app
from zimage.weights import DOWNLOAD_HINT

ZIMAGE = Path(sys.executable).parent / "zimage"
COMPONENTS = ["model_index", "scheduler", "tokenizer", "text_encoder", "transformer", "vae"]
WEIGHTS = {"text_encoder": "model", "transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
FINAL_BIAS = "all_final_layer.2-1.linear.bias"


def check(model: Path, *args: str):
    return CliRunner().invoke(app, ["check", "--model-path", str(model), *args])


def snapshot(root: Path) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def lines_by_component(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name in COMPONENTS:
            assert name not in out, f"two lines for {name}"
            out[name] = line
    return out


def header_totals(folder: Path, stem: str) -> tuple[int, int, set[str], int]:
    """(files, parameters, dtypes, bytes) of a component, read straight from its safetensors headers."""
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    params, dtypes, nbytes = 0, set(), 0
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                dtypes.add(sl.get_dtype())
                nbytes += n * sizes[sl.get_dtype()]
    return len(files), params, dtypes, nbytes


def size_in_line(line: str) -> float:
    m = re.search(r"([\d.]+) (GiB|MiB|KiB|B)$", line)
    assert m, f"no size at the end of {line!r}"
    return float(m[1]) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[m[2]]


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "model"))


@pytest.fixture
def sharded(checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoints["sharded"], tmp_path / "sharded"))


# ------------------------------------------------------------------------------------------------- all good

@pytest.mark.parametrize("name", ["single", "sharded", "wide"])
def test_good_checkpoint_gives_one_ok_line_per_component(checkpoints, name):
    path = checkpoints[name]
    before = snapshot(path)
    result = check(path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "all good"
    lines = lines_by_component(result.stdout)
    assert list(lines) == COMPONENTS
    for component, stem in WEIGHTS.items():
        files, params, dtypes, nbytes = header_totals(path / component, stem)
        line = lines[component]
        assert re.match(rf"{component}\s+ok\s", line), line
        assert f"{files} file(s)" in line and f"{params:,} parameters" in line
        assert "/".join(sorted(dtypes)) in line
        assert size_in_line(line) == pytest.approx(nbytes, rel=0.01)
    assert result.stderr == ""
    assert snapshot(path) == before


def test_json_report_for_scripts(checkpoints):
    path = checkpoints["sharded"]
    result = check(path, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["model_path"] == str(path)
    by_name = {c["name"]: c for c in report["components"]}
    assert list(by_name) == COMPONENTS
    for component, stem in WEIGHTS.items():
        files, params, dtypes, nbytes = header_totals(path / component, stem)
        c = by_name[component]
        assert (c["ok"], c["files"], c["parameters"], set(c["dtypes"]), c["bytes"], c["problem"]) == \
            (True, files, params, dtypes, nbytes, None)


def test_check_reads_headers_only(tiny, monkeypatch, loads):
    """No tensor data is read: safetensors files are opened for names, dtypes and shapes only, and nothing loads."""
    real_open = zimage.weights.safe_open
    opened = []

    class HeaderOnlySlice:
        def __init__(self, sl):
            self._sl = sl

        def get_shape(self):
            return self._sl.get_shape()

        def get_dtype(self):
            return self._sl.get_dtype()

        def __getitem__(self, index):
            raise AssertionError("check read tensor data through a slice")

    class HeaderOnly:
        def __init__(self, path, framework, **kwargs):
            opened.append(path)
            self._f = real_open(path, framework=framework, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def metadata(self):
            return self._f.metadata()

        def get_slice(self, name):
            return HeaderOnlySlice(self._f.get_slice(name))

        def get_tensor(self, name):
            raise AssertionError(f"check read tensor {name}")

    monkeypatch.setattr(zimage.weights, "safe_open", HeaderOnly)
    result = check(tiny)
    assert result.exit_code == 0, result.output
    assert "AssertionError" not in result.output
    assert loads == []
    assert len(set(opened)) == 3  # every weight file's header was read


def test_check_does_not_read_values(model):
    """A checkpoint full of NaN has the right layout, names and shapes: check passes it (values are generate's
    business), which shows it never looked at them."""
    path = model / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(path))
    assert check(model).exit_code == 0


# -------------------------------------------------------------------------------------------- problems found

def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def write(rel: str, text: str):
    return lambda m: (m / rel).write_text(text)


def set_config(rel: str, **values):
    def change(m: Path) -> None:
        config = json.loads((m / rel).read_text())
        config.update(values)
        (m / rel).write_text(json.dumps(config))
    return change


def edit_tensors(rel: str, change):
    def damage(m: Path) -> None:
        state = load_file(str(m / rel))
        change(state)
        save_file(state, str(m / rel), metadata={"format": "pt"})
    return damage


def truncate(rel: str, keep: float):
    def damage(m: Path) -> None:
        data = (m / rel).read_bytes()
        (m / rel).write_bytes(data[: int(len(data) * keep)])
    return damage


TR = "transformer/diffusion_pytorch_model.safetensors"
TE = "text_encoder/model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"

# case: (component that fails, damage, phrases of its line; "{m}" is the model folder)
DAMAGE = {
    "model_index.json missing": ("model_index", lambda m: remove(m / "model_index.json"),
                                 ["missing {m}/model_index.json"]),
    "model_index.json not JSON": ("model_index", write("model_index.json", "{oops"),
                                  ["{m}/model_index.json is not valid JSON"]),
    "model_index.json a list": ("model_index", write("model_index.json", "[]"),
                                ["{m}/model_index.json must hold a JSON object"]),
    **{f"{c} folder missing": (c, lambda m, c=c: remove(m / c), ["missing component folder {m}/" + c])
       for c in COMPONENTS[1:]},
    **{f"{rel} missing": (rel.split("/")[0], lambda m, rel=rel: remove(m / rel), ["missing {m}/" + rel])
       for rel in ["scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json", "text_encoder/config.json",
                   "transformer/config.json", "vae/config.json"]},
    "scheduler config not JSON": ("scheduler", write("scheduler/scheduler_config.json", "{"),
                                  ["{m}/scheduler/scheduler_config.json is not valid JSON"]),
    "scheduler option unsupported": ("scheduler", set_config("scheduler/scheduler_config.json", use_karras_sigmas=True),
                                     ["{m}/scheduler/scheduler_config.json", "'use_karras_sigmas' is not supported"]),
    "tokenizer files missing": ("tokenizer", lambda m: [remove(m / "tokenizer" / f) for f in
                                                        ("tokenizer.json", "vocab.json")],
                                ["missing {m}/tokenizer/tokenizer.json"]),
    "tokenizer merges missing": ("tokenizer", lambda m: [remove(m / "tokenizer" / f) for f in
                                                         ("tokenizer.json", "merges.txt")],
                                 ["{m}/tokenizer/merges.txt"]),
    "transformer config not JSON": ("transformer", write("transformer/config.json", "{"),
                                    ["{m}/transformer/config.json is not valid JSON"]),
    "transformer config a list": ("transformer", write("transformer/config.json", "[1, 2]"),
                                  ["{m}/transformer/config.json must hold a JSON object"]),
    "transformer heads do not fit": ("transformer", set_config("transformer/config.json", n_heads=5),
                                     ["{m}/transformer/config.json", "head_dim"]),
    "transformer dim not a number": ("transformer", set_config("transformer/config.json", dim="wide"),
                                     ["{m}/transformer/config.json"]),
    "transformer config of another size": ("transformer", set_config("transformer/config.json", dim=128,
                                                                                     n_heads=4, n_kv_heads=4),
                                           ["has shape", "expected", "{m}/transformer/config.json"]),
    "vae groups do not fit": ("vae", set_config("vae/config.json", norm_num_groups=5),
                              ["{m}/vae/config.json", "num_groups"]),
    "text encoder hidden size not a number": ("text_encoder", set_config("text_encoder/config.json", hidden_size="x"),
                                              ["{m}/text_encoder/config.json", "hidden_size"]),
    "text encoder weights missing": ("text_encoder", lambda m: remove(m / TE), ["missing {m}/" + TE]),
    "transformer weights missing": ("transformer", lambda m: remove(m / TR), ["missing {m}/" + TR]),
    "vae weights truncated": ("vae", truncate(VAE, 0.5), ["{m}/" + VAE, "not a readable safetensors file"]),
    "transformer weights missing the last bytes": ("transformer", truncate(TR, 0.999),
                                                   ["{m}/" + TR, "not a readable safetensors file"]),
    "text encoder weights empty": ("text_encoder", write(TE, ""), ["{m}/" + TE, "not a readable safetensors file"]),
    "transformer tensor of the wrong shape": ("transformer",
                                              edit_tensors(TR, lambda s: s.__setitem__(FINAL_BIAS, torch.zeros(5))),
                                              ["diffusion_pytorch_model.safetensors", FINAL_BIAS, "shape [5]",
                                               "expected [64]"]),
    "transformer tensor missing": ("transformer", edit_tensors(TR, lambda s: s.pop(FINAL_BIAS)),
                                   [FINAL_BIAS, "missing"]),
    "text encoder tensor unexpected": ("text_encoder",
                                       edit_tensors(TE, lambda s: s.__setitem__("model.extra.weight", torch.zeros(2))),
                                       ["model.safetensors", "unexpected tensor 'model.extra.weight'"]),
    "vae tensor of the wrong shape": ("vae", edit_tensors(VAE, lambda s: s.__setitem__("decoder.conv_out.bias",
                                                                                      torch.zeros(4))),
                                      ["decoder.conv_out.bias", "shape [4]", "expected [3]"]),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_each_problem_fails_its_component_and_only_it(model, case):
    component, damage, phrases = DAMAGE[case]
    damage(model)
    before = snapshot(model)
    result = check(model)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout.splitlines()[-1] == "problems found"
    lines = lines_by_component(result.stdout)
    assert list(lines) == COMPONENTS  # every component still gets its line
    assert re.match(rf"{component}\s+FAIL\s", lines[component]), lines[component]
    for phrase in phrases:
        assert phrase.replace("{m}", str(model)) in lines[component], lines[component]
    others = [line for name, line in lines.items() if name != component]
    assert all(" ok" in line and "FAIL" not in line for line in others), others
    assert snapshot(model) == before

    report = json.loads(check(model, "--json").stdout)
    assert report["ok"] is False
    by_name = {c["name"]: c for c in report["components"]}
    assert by_name[component]["ok"] is False and by_name[component]["problem"] in lines[component]
    assert [c["name"] for c in report["components"] if not c["ok"]] == [component]


def test_missing_model_folder(tmp_path):
    result = check(tmp_path / "nowhere")
    assert result.exit_code == 1
    assert f"model folder {tmp_path / 'nowhere'} not found" in result.stdout
    assert DOWNLOAD_HINT not in result.stdout  # the download command is for the default folder only
    assert result.stdout.splitlines()[-1] == "problems found"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])  # the VAE is always one file
def test_missing_shard_listed_in_the_index(sharded, component):
    index = next((sharded / component).glob("*.safetensors.index.json"))
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (sharded / component / shard).unlink()
    result = check(sharded)
    assert result.exit_code == 1
    line = lines_by_component(result.stdout)[component]
    assert "FAIL" in line and str(sharded / component / shard) in line and index.name in line
    assert DOWNLOAD_HINT not in line  # the download command is for the default folder only


def test_index_entry_pointing_at_the_wrong_shard(sharded):
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    name = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][name] = shards[1]
    index.write_text(json.dumps(data))
    result = check(sharded)
    assert result.exit_code == 1
    line = lines_by_component(result.stdout)["transformer"]
    assert "FAIL" in line and name in line and shards[1] in line and "index" in line


def test_index_without_a_weight_map(sharded):
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    result = check(sharded)
    assert result.exit_code == 1
    line = lines_by_component(result.stdout)["transformer"]
    assert "FAIL" in line and str(index) in line and "weight_map" in line


def test_truncated_shard(sharded):
    shard = sorted((sharded / "text_encoder").glob("*-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    result = check(sharded)
    assert result.exit_code == 1
    line = lines_by_component(result.stdout)["text_encoder"]
    assert "FAIL" in line and str(shard) in line


def test_several_problems_are_all_listed(model):
    (model / "model_index.json").unlink()
    remove(model / "vae")
    truncate(TR, 0.5)(model)
    result = check(model)
    assert result.exit_code == 1
    failing = [name for name, line in lines_by_component(result.stdout).items() if "FAIL" in line]
    assert failing == ["model_index", "transformer", "vae"]


def test_command_exit_codes_and_json_end_to_end(model):
    """The installed command: a damaged copy exits 1 with a JSON report on stdout and nothing on stderr."""
    truncate(VAE, 0.5)(model)
    result = subprocess.run([str(ZIMAGE), "check", "--model-path", str(model), "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [c["name"] for c in report["components"] if not c["ok"]] == ["vae"]
