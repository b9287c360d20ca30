"""Single-file checkpoints (`--transformer`, `--text-encoder`, `--vae`, `--tokenizer`): every layout loads the same
tensors as the published folder and makes the same image; bad files fail with one line before anything loads.

The files are written by converters from the published key conventions (below), which are first checked against
diffusers' own single-file conversions (`diffusers.loaders.single_file_utils`) where those exist."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from zimage import singlefile
from zimage.cli import app
from zimage.modelfiles import ModelFiles
from zimage.pipeline import load_transformer, load_vae
from zimage.text_encoder import TextEncoder
from zimage.tiny import TinySpec, make_tiny
from zimage.weights import WEIGHT_STEMS, checkpoint_header, read_header

CPU = torch.device("cpu")
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "3", "-q"]
# shapes whose hidden config values (RoPE axes, group count, eps, rope theta) are the published ones, so that
# files alone, with the configs built into zimage, describe the model
PUBLISHED_LIKE = TinySpec(dim=256, n_heads=2, axes_dims=(32, 48, 48), te_hidden=64, te_heads=4, te_kv_heads=2,
                          vae_channels=(32, 32, 32, 32), vae_groups=32, seed=5)


# ------------------------------------------------------------------------------------- converters for the tests

def folder_state(model: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder (one file or shards), under its published names."""
    header = checkpoint_header(model / name, WEIGHT_STEMS[name])
    state: dict[str, torch.Tensor] = {}
    for path in sorted({p for p, _ in header.values()}):
        state.update(load_file(str(path)))
    return state


ORIGINAL_NAMES = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
                  ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
                  ".attention.norm_k.": ".attention.k_norm."}


def to_original_transformer(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Published (diffusers) transformer tensors in the original Z-Image / ComfyUI names: q, k, v fused into
    `attention.qkv` (stacked along dim 0 in that order), `attention.out`, `q_norm`/`k_norm`, `x_embedder`,
    `final_layer`."""
    out = {}
    for key, value in state.items():
        if any(f".attention.to_{c}." in key for c in "kv"):
            continue
        if ".attention.to_q." in key:
            value = torch.cat([value, state[key.replace("to_q", "to_k")], state[key.replace("to_q", "to_v")]])
            key = key.replace(".attention.to_q.", ".attention.qkv.")
        for ours, original in ORIGINAL_NAMES.items():
            key = key.replace(ours, original) if ours.startswith(".") else (
                original + key[len(ours):] if key.startswith(ours) else key)
        out[prefix + key] = value
    return out


def to_bfl_vae(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Published (diffusers) VAE tensors in Black Forest Labs' `ae.safetensors` names: `down.N.block.M`,
    `up.N` numbered from the lowest resolution, `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}` with the
    projections as 1x1 convolutions, `nin_shortcut`, `norm_out`."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for i in range(levels):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        for j in (0, 1):
            new = new.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        for ours, bfl in attention.items():
            if f"mid_block.attentions.0.{ours}." in new:
                new = new.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{bfl}.")
                if bfl != "norm" and new.endswith(".weight"):
                    value = value[:, :, None, None]
        out[new] = value
    return out


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def vae_levels(model: Path) -> int:
    return len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])


TRANSFORMER_LAYOUTS = {
    "original": lambda s: to_original_transformer(s),
    "original, diffusion_model.": lambda s: to_original_transformer(s, "diffusion_model."),
    "original, model.diffusion_model.": lambda s: to_original_transformer(s, "model.diffusion_model."),
    "diffusers in one file": lambda s: dict(s),
    "diffusers, model.diffusion_model.": lambda s: {f"model.diffusion_model.{k}": v for k, v in s.items()},
}
TEXT_ENCODER_LAYOUTS = {
    "model.": lambda s: {f"model.{k.removeprefix('model.')}": v for k, v in s.items()},
    "bare": lambda s: {k.removeprefix("model."): v for k, v in s.items()},
}


def vae_layouts(levels: int) -> dict:
    return {"bfl": lambda s: to_bfl_vae(s, levels), "diffusers in one file": lambda s: dict(s),
            "bfl, first_stage_model.": lambda s: {f"first_stage_model.{k}": v
                                                  for k, v in to_bfl_vae(s, levels).items()}}


def single_files(model: Path, out: Path, transformer="original, model.diffusion_model.", text_encoder="model.",
                 vae="bfl") -> dict[str, Path]:
    """The three components of a folder as single files in the given layouts."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        "transformer": save(TRANSFORMER_LAYOUTS[transformer](folder_state(model, "transformer")),
                            out / "z_image_turbo.safetensors"),
        "text_encoder": save(TEXT_ENCODER_LAYOUTS[text_encoder](folder_state(model, "text_encoder")),
                             out / "qwen_3_4b.safetensors"),
        "vae": save(vae_layouts(vae_levels(model))[vae](folder_state(model, "vae")), out / "ae.safetensors"),
    }


# --------------------------------------------------------------------- the converters agree with diffusers

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_transformer_converter_matches_diffusers(checkpoints, prefix):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    published = folder_state(checkpoints["sharded"], "transformer")
    back = convert_z_image_transformer_checkpoint_to_diffusers(to_original_transformer(published, prefix))
    assert back.keys() == published.keys()
    assert all(torch.equal(back[k], published[k]) for k in published)


def test_bfl_vae_converter_matches_diffusers(checkpoints):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = checkpoints["wide"]
    published = folder_state(model, "vae")
    config = json.loads((model / "vae" / "config.json").read_text())
    back = convert_ldm_vae_checkpoint(to_bfl_vae(published, vae_levels(model)), config)
    assert back.keys() == published.keys()
    assert all(torch.equal(back[k], published[k]) for k in published)


# ------------------------------------------------------------------- names: every layout maps onto ours

@pytest.mark.parametrize("layout", TRANSFORMER_LAYOUTS)
def test_transformer_names_map_onto_the_published_ones(checkpoints, tmp_path, layout):
    published = folder_state(checkpoints["sharded"], "transformer")
    path = save(TRANSFORMER_LAYOUTS[layout](published), tmp_path / "t.safetensors")
    found = singlefile.pieces("transformer", read_header(path))
    assert found.keys() == published.keys()
    qkv = {k: p for k, p in found.items() if p.parts == 3}
    attentions = sum(1 for k in published if k.endswith(".attention.to_q.weight"))
    assert len(qkv) == (3 * attentions if layout.startswith("original") else 0)
    assert all(p.name.endswith(".attention.qkv.weight") and k.split(".")[-2] == f"to_{'qkv'[p.part]}"
               for k, p in qkv.items())


def test_norm_final_of_original_files_is_skipped():
    assert singlefile.transformer_pieces_of("model.diffusion_model.norm_final.weight") == {}
    assert singlefile.transformer_pieces_of("layers.3.attention.qkv.weight") == {
        f"layers.3.attention.to_{c}.weight": singlefile.Piece("layers.3.attention.qkv.weight", i, 3)
        for i, c in enumerate("qkv")}


# --------------------------------------------------------------- loading: the same tensors as the folder

def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", TRANSFORMER_LAYOUTS)
def test_transformer_file_loads_the_folder_tensors(checkpoints, tmp_path, layout):
    model = checkpoints["sharded"]
    path = save(TRANSFORMER_LAYOUTS[layout](folder_state(model, "transformer")), tmp_path / "t.safetensors")
    ours = load_transformer(ModelFiles(model, transformer=path), CPU, torch.bfloat16)
    assert ours.cfg == load_transformer(model, CPU, torch.bfloat16).cfg
    same_state(ours, load_transformer(model, CPU, torch.bfloat16))


@pytest.mark.parametrize("layout", ["bfl", "diffusers in one file", "bfl, first_stage_model."])
def test_vae_file_loads_the_folder_tensors(checkpoints, tmp_path, layout):
    model = checkpoints["wide"]
    path = save(vae_layouts(vae_levels(model))[layout](folder_state(model, "vae")), tmp_path / "ae.safetensors")
    same_state(load_vae(ModelFiles(model, vae=path), CPU), load_vae(model, CPU))


@pytest.mark.parametrize("layout", TEXT_ENCODER_LAYOUTS)
def test_text_encoder_file_loads_the_folder_tensors(checkpoints, tmp_path, layout):
    model = checkpoints["sharded"]
    path = save(TEXT_ENCODER_LAYOUTS[layout](folder_state(model, "text_encoder")), tmp_path / "qwen.safetensors")
    same_state(TextEncoder.load(ModelFiles(model, text_encoder=path), CPU, torch.float32).model,
               TextEncoder.load(model, CPU, torch.float32).model)


def test_configs_come_from_the_shapes_and_the_published_config(tmp_path):
    """Without a folder, every size comes from the files and the rest from the configs built into zimage."""
    model = make_tiny(tmp_path / "model", PUBLISHED_LIKE)
    files = single_files(model, tmp_path / "files")
    sources = ModelFiles(None, files["transformer"], files["text_encoder"], files["vae"], model / "tokenizer")
    assert load_transformer(sources, CPU, torch.float32).cfg == PUBLISHED_LIKE.transformer_config()
    assert load_vae(sources, CPU).cfg == PUBLISHED_LIKE.vae_config()
    same_state(TextEncoder.load(sources, CPU, torch.float32).model, TextEncoder.load(model, CPU, torch.float32).model)


# ------------------------------------------------------------------ the real command: the same image

def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def run(*args: str):
    return CliRunner().invoke(app, ["generate", "-p", "a red chair", *SMALL, *args])


def test_generate_with_single_files_makes_the_folder_image(checkpoints, tmp_path):
    model = checkpoints["single"]
    files = single_files(model, tmp_path / "files", "original", "bare", "bfl")
    folder_run = run("--model-path", str(model), "-o", str(tmp_path / "folder.png"))
    assert folder_run.exit_code == 0, folder_run.output
    files_run = run("--model-path", str(model), "--transformer", str(files["transformer"]), "--text-encoder",
                    str(files["text_encoder"]), "--vae", str(files["vae"]), "-o", str(tmp_path / "files.png"))
    assert files_run.exit_code == 0, files_run.output
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "files.png"))


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """A working folder without weights/Z-Image-Turbo and an empty Hugging Face cache: no model folder anywhere."""
    from huggingface_hub import constants

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    return cwd


def test_generate_from_files_alone_uses_the_published_configs(tmp_path, nowhere):
    model = make_tiny(tmp_path / "model", PUBLISHED_LIKE)
    files = single_files(model, tmp_path / "files")
    folder_run = run("--model-path", str(model), "-o", str(tmp_path / "folder.png"))
    assert folder_run.exit_code == 0, folder_run.output
    shutil.copytree(model / "tokenizer", tmp_path / "tok")
    files_run = run("--transformer", str(files["transformer"]), "--text-encoder", str(files["text_encoder"]),
                    "--vae", str(files["vae"]), "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "f.png"))
    assert files_run.exit_code == 0, files_run.output
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "f.png"))


def test_check_reports_each_single_file(checkpoints, tmp_path):
    model = checkpoints["single"]
    files = single_files(model, tmp_path / "files")
    result = CliRunner().invoke(app, ["check", "--model-path", str(model), "--transformer", str(files["transformer"]),
                                      "--text-encoder", str(files["text_encoder"]), "--vae", str(files["vae"]),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    for name in ("transformer", "text_encoder", "vae"):
        assert report[name]["ok"] and report[name]["source"] == str(files[name]) and report[name]["files"] == 1
    swapped = CliRunner().invoke(app, ["check", "--model-path", str(model), "--transformer", str(files["vae"])])
    assert swapped.exit_code == 1
    lines = {line.split()[0]: line for line in swapped.stdout.splitlines()[:-1]}
    assert "FAIL" in lines["transformer"] and "give it as --vae" in lines["transformer"]
    assert all("FAIL" not in line for name, line in lines.items() if name != "transformer")


# ---------------------------------------------------------------------- bad files: one line, nothing written

def snapshot(*roots: Path) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for root in roots for p in sorted(Path(root).rglob("*"))}


def one_line_error(result, code: int, *phrases: str) -> None:
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def misshapen(files: dict[str, Path], tmp_path: Path) -> Path:
    state = load_file(str(files["transformer"]))
    key = "layers.1.feed_forward.w1.weight"
    state[key] = state[key][:-1]
    return save(state, tmp_path / "misshapen.safetensors")


def other_model(files: dict[str, Path], tmp_path: Path) -> Path:
    return save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 4)},
                tmp_path / "flux.safetensors")


def not_safetensors(files: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04 a pickle, not a safetensors file" * 10)
    return path


BAD_TRANSFORMERS = {
    "another model": (other_model, 2, ["is not a Z-Image transformer", "double_blocks.0.img_attn.qkv.weight"]),
    "the VAE given as the transformer": (lambda f, t: f["vae"], 2, ["holds a Z-Image vae", "give it as --vae"]),
    "a misshapen tensor": (misshapen, 1, ["layers.1.feed_forward.w1.weight", "has shape"]),
    "not a safetensors file": (not_safetensors, 1, ["model.ckpt", "not a readable safetensors file"]),
    "no such file": (lambda f, t: t / "missing.safetensors", 2, ["--transformer: no such file", "missing.safetensors"]),
}


@pytest.mark.parametrize("case", BAD_TRANSFORMERS)
def test_bad_transformer_file(checkpoints, tmp_path, case):
    model = checkpoints["single"]
    files = single_files(model, tmp_path / "files", transformer="original")
    make, code, phrases = BAD_TRANSFORMERS[case]
    bad = make(files, tmp_path)
    before = snapshot(tmp_path)
    result = run("--model-path", str(model), "--transformer", str(bad), "-o", str(tmp_path / "out" / "x.png"))
    one_line_error(result, code, *phrases)
    assert snapshot(tmp_path) == before


def test_missing_tokenizer_without_model_path(tmp_path, nowhere):
    model = make_tiny(tmp_path / "model", PUBLISHED_LIKE)
    files = single_files(model, tmp_path / "files")
    before = snapshot(tmp_path)
    result = run("--transformer", str(files["transformer"]), "--text-encoder", str(files["text_encoder"]),
                 "--vae", str(files["vae"]), "-o", str(tmp_path / "out.png"))
    one_line_error(result, 2, "no tokenizer", "--tokenizer DIR", "--model-path")
    assert snapshot(tmp_path) == before


def test_missing_component_without_model_path(tmp_path, nowhere):
    model = make_tiny(tmp_path / "model", PUBLISHED_LIKE)
    files = single_files(model, tmp_path / "files")
    result = run("--transformer", str(files["transformer"]), "--vae", str(files["vae"]), "--tokenizer",
                 str(model / "tokenizer"), "-o", str(tmp_path / "out.png"))
    one_line_error(result, 2, "text encoder", "--text-encoder FILE")
    assert not (tmp_path / "out.png").exists()


def test_sizes_the_published_config_cannot_explain_ask_for_the_config(checkpoints, tmp_path, nowhere):
    """A tiny transformer's head width does not fit the published RoPE axes: the error says to give its config."""
    files = single_files(checkpoints["single"], tmp_path / "files")
    result = run("--transformer", str(files["transformer"]), "--text-encoder", str(files["text_encoder"]),
                 "--vae", str(files["vae"]), "--tokenizer", str(checkpoints["single"] / "tokenizer"),
                 "-o", str(tmp_path / "out.png"))
    one_line_error(result, 1, "z_image_turbo.safetensors", "give --model-path with the transformer/config.json")
    assert not (tmp_path / "out.png").exists()


def test_fused_qkv_pieces_own_exactly_their_rows(checkpoints, tmp_path):
    """Loading stays lean: q, k and v cut from a fused qkv tensor (same dtype as stored, so no conversion copies
    them) each hold only their own rows, never a view that keeps the whole fused tensor (or the read buffer) alive."""
    model = checkpoints["single"]
    path = save(to_original_transformer(folder_state(model, "transformer")), tmp_path / "t.safetensors")
    ours = load_transformer(ModelFiles(model, transformer=path), CPU, torch.float32)
    for name, p in ours.state_dict().items():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    same_state(ours, load_transformer(model, CPU, torch.float32))
