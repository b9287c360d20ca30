"""LoRA files: every key dialect gives the image diffusers 0.42 gives with the same file (load_lora_weights +
fuse_lora / set_adapters, float32), formats diffusers does not read give the image of the same update written in
one it reads, and bad LoRA files fail with one line before any weights load.

LoRA files are written with peft (the adapters diffusers' own training scripts save), then renamed into each
trainer's key dialect the way that trainer names them.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import zimage.pipeline
from zimage.cli import app
from zimage.lora import LoraSet, model_shapes, read_lora
from zimage.pipeline import load_transformer

from test_errors import assert_one_line_error, snapshot

PROMPT, SEED, SIZE = "a red fox in the snow", 11, 64
BLOCKS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
REFINERS_ADALN = ["noise_refiner.0.attention.to_q", "noise_refiner.0.feed_forward.w2", "context_refiner.0.attention.to_v",
                  "context_refiner.0.feed_forward.w1", "layers.0.adaLN_modulation.0",
                  "noise_refiner.0.adaLN_modulation.0", "all_final_layer.2-1.adaLN_modulation.1",
                  "all_final_layer.2-1.linear", "all_x_embedder.2-1", "t_embedder.mlp.0", "cap_embedder.1"]


# ---------------------------------------------------------------------------------------------------- writers

def peft_lora(model: Path, targets: list[str], r: int = 4, alpha: float = 8, seed: int = 0,
              std: float = 0.3) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A random LoRA made by peft on the diffusers transformer: its state dict under diffusers module names
    (`X.lora_A.weight`, `X.lora_B.weight`) and its config."""
    t = ZImageTransformer2DModel.from_pretrained(str(model / "transformer"))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    t.add_adapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B is zero at init in real training; a trained-looking update needs both random
        for name, p in t.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[1] ** 0.5)
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(t).items()}, cfg


def save_diffusers(sd, cfg: LoraConfig, folder: Path) -> Path:
    sd = {k: v.clone() for k, v in sd.items()}  # safetensors refuses tensors that share memory
    ZImagePipeline.save_lora_weights(str(folder), transformer_lora_layers=sd,
                                     transformer_lora_adapter_metadata=cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def modules(sd) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k[: -len(".lora_A.weight")]: (sd[k], sd[k.replace("lora_A", "lora_B")]) for k in sd if ".lora_A." in k}


def dialect(sd, cfg: LoraConfig, name: str) -> dict[str, torch.Tensor]:
    """The same LoRA under another trainer's key names (alpha stored as a tensor where that trainer does)."""
    out = {}
    alpha = torch.tensor(float(cfg.lora_alpha))
    for m, (down, up) in modules(sd).items():
        if name == "ai-toolkit":
            out |= {f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up,
                    f"diffusion_model.{m}.alpha": alpha}
        elif name == "kohya":
            k = "lora_unet_" + m.replace(".", "_")
            out |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": alpha}
        elif name == "diffsynth":  # DiffSynth-Studio stores no alpha: the update is B @ A
            out |= {f"{m}.lora_A.default.weight": down * (cfg.lora_alpha / cfg.r), f"{m}.lora_B.default.weight": up}
    return out


def fused_qkv(sd, cfg: LoraConfig, dotted: bool) -> dict[str, torch.Tensor]:
    """q, k, v LoRAs of every main layer fused into one `attention.qkv` LoRA, as ComfyUI-native trainers save them
    (one down matrix: q, k and v share it here so that the split back is exact; up matrices stacked q, k, v).
    `dotted`: kohya names with `.lora.down.weight` (a layout diffusers reads), else original names with lora_A/B."""
    out, alpha = {}, torch.tensor(float(cfg.lora_alpha))
    mods = modules(sd)
    for m, (down, up) in mods.items():
        if ".attention.to_q" in m and m.startswith("layers."):
            block = m[: -len(".to_q")]
            ups = torch.cat([mods[f"{block}.to_{p}"][1] for p in "qkv"])
            if dotted:
                k = "lora_unet_" + block.replace(".", "_") + "_qkv"
                out |= {f"{k}.lora.down.weight": down, f"{k}.lora.up.weight": ups, f"{k}.alpha": alpha}
            else:
                k = f"diffusion_model.{block}.qkv"
                out |= {f"{k}.lora_A.weight": down, f"{k}.lora_B.weight": ups, f"{k}.alpha": alpha}
    return out


def shared_down(sd) -> dict[str, torch.Tensor]:
    """Give to_k and to_v of every block to_q's down matrix, so that q, k, v fuse into one LoRA exactly."""
    sd = dict(sd)
    for k in list(sd):
        if ".to_q.lora_A." in k:
            for p in "kv":
                sd[k.replace(".to_q.", f".to_{p}.")] = sd[k]
    return sd


def write(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------------- running

def ours(model: Path, out: Path, *args: str) -> np.ndarray:
    result = CliRunner().invoke(app, ["generate", "--model-path", str(model), "-p", PROMPT, "--width", str(SIZE),
                                      "--height", str(SIZE), "--seed", str(SEED), "-o", str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def reference(model: Path, loras: list[tuple[Path, float]] = (), fuse: bool = True, pipe=None) -> np.ndarray:
    """diffusers' image with `loras` loaded by load_lora_weights: one fused with fuse_lora(lora_scale=s), several
    weighted with set_adapters."""
    if pipe is None:
        pipe = ZImagePipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(loras) == 1 and fuse:
        pipe.fuse_lora(lora_scale=loras[0][1], adapter_names=names)
    elif loras:
        pipe.set_adapters(names, [s for _, s in loras])
    image = pipe(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=8, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def base_image(tiny) -> np.ndarray:
    return reference(tiny)


def assert_matches(got: np.ndarray, expected: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(got - expected).max() <= 2
    assert np.abs(got - base).max() > 10  # the LoRA changed the picture: the comparison is not vacuous


# ---------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", ["diffusers", "ai-toolkit", "kohya", "diffsynth"])
def test_each_dialect_matches_diffusers_on_the_same_file(tiny, tmp_path, base_image, name):
    sd, cfg = peft_lora(tiny, BLOCKS)
    path = save_diffusers(sd, cfg, tmp_path / "d") if name == "diffusers" else \
        write(dialect(sd, cfg, name), tmp_path / f"{name}.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{path}:0.8")
    assert_matches(got, reference(tiny, [(path, 0.8)]), base_image)


def test_two_loras_with_different_scales_match_set_adapters(tiny, tmp_path, base_image):
    a, b = (save_diffusers(*peft_lora(tiny, t, seed=s), tmp_path / n)
            for n, t, s in (("a", BLOCKS, 1), ("b", ["to_q", "to_v", "w2"], 2)))
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{a}:0.7", "--lora", f"{b}:1.3")
    assert_matches(got, reference(tiny, [(a, 0.7), (b, 1.3)]), base_image)


@pytest.mark.parametrize("name", ["diffusers", "kohya"])
def test_lora_on_refiners_adaln_and_embedders_matches_diffusers(tiny, tmp_path, base_image, name):
    sd, cfg = peft_lora(tiny, REFINERS_ADALN, r=2, alpha=2, seed=3)
    assert any("adaLN_modulation" in k for k in sd) and any("refiner" in k for k in sd)
    path = save_diffusers(sd, cfg, tmp_path / "d") if name == "diffusers" else \
        write(dialect(sd, cfg, name), tmp_path / "k.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", str(path))
    assert_matches(got, reference(tiny, [(path, 1.0)]), base_image)


def test_fused_qkv_kohya_dot_names_match_diffusers(tiny, tmp_path, base_image):
    sd, cfg = peft_lora(tiny, ["to_q", "to_k", "to_v", "to_out.0"], seed=4)
    path = write(fused_qkv(shared_down(sd), cfg, dotted=True), tmp_path / "qkv.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{path}:1.2")
    assert_matches(got, reference(tiny, [(path, 1.2)]), base_image)


def test_fused_qkv_original_names_match_the_split_lora(tiny, tmp_path, base_image):
    """diffusers does not read `diffusion_model.layers.N.attention.qkv` with lora_A/B: compare against the same
    update split into to_q, to_k, to_v."""
    sd, cfg = peft_lora(tiny, ["to_q", "to_k", "to_v"], seed=5)
    sd = {k: v for k, v in shared_down(sd).items() if k.startswith("layers.")}  # qkv exists in the main layers
    fused = write(fused_qkv(sd, cfg, dotted=False), tmp_path / "comfy.safetensors")
    split = save_diffusers(sd, cfg, tmp_path / "split")
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{fused}:0.9")
    assert_matches(got, reference(tiny, [(split, 0.9)]), base_image)


def full_rank_lora(deltas: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A PEFT LoRA whose update is exactly `deltas` (module -> (out, in) update): B = delta, A = identity."""
    r = max(d.shape[1] for d in deltas.values())
    sd = {}
    for m, d in deltas.items():
        sd[f"{m}.lora_A.weight"] = torch.eye(d.shape[1], r).T.contiguous()
        sd[f"{m}.lora_B.weight"] = torch.nn.functional.pad(d, (0, r - d.shape[1]))
    return sd, LoraConfig(r=r, lora_alpha=r, target_modules=sorted(deltas))


def test_loha_matches_the_same_update_as_a_lora(tiny, tmp_path, base_image):
    gen = torch.Generator().manual_seed(6)
    shapes = model_shapes(tiny)["transformer"]
    state, deltas, rank, alpha = {}, {}, 2, 3.0
    for m in ["layers.0.attention.to_v", "layers.1.feed_forward.w1", "layers.1.attention.to_out.0",
              "noise_refiner.0.adaLN_modulation.0", "all_final_layer.2-1.linear"]:
        out, inp = shapes[m + ".weight"]
        w1a, w2a = (torch.randn(out, rank, generator=gen) for _ in range(2))
        w1b, w2b = (torch.randn(rank, inp, generator=gen) / inp**0.5 for _ in range(2))
        k = "lycoris_" + m.replace(".", "_")
        state |= {f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b,
                  f"{k}.alpha": torch.tensor(alpha)}
        deltas[m] = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)  # LyCORIS: (w1a w1b) ⊙ (w2a w2b) · alpha/rank
    loha = write(state, tmp_path / "loha.safetensors")
    same = save_diffusers(*full_rank_lora(deltas), tmp_path / "lora")
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{loha}:0.5")
    assert_matches(got, reference(tiny, [(same, 0.5)]), base_image)


def lokr_state(tiny, modules_: list[str], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """LoKr with a whole w1 (8x8) and w2 as a rank-2 product, alpha 4 (LyCORIS' default layout for a small rank)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(tiny)["transformer"]
    state = {}
    for m in modules_:
        out, inp = shapes[m + ".weight"]
        k = prefix + (m.replace(".", "_") if prefix == "lycoris_" else m)
        state |= {f"{k}.lokr_w1": torch.randn(8, 8, generator=gen) * 0.3,
                  f"{k}.lokr_w2_a": torch.randn(out // 8, 2, generator=gen),
                  f"{k}.lokr_w2_b": torch.randn(2, inp // 8, generator=gen) / (inp // 8) ** 0.5,
                  f"{k}.alpha": torch.tensor(4.0)}
    return state


LOKR_MODULES = [f"layers.{i}.attention.to_{p}" for i in range(2) for p in ("q", "k", "v", "out.0")]


def test_lokr_matches_diffusers_on_the_same_file(tiny, tmp_path, base_image):
    path = write(lokr_state(tiny, LOKR_MODULES, "diffusion_model.", 7), tmp_path / "lokr.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", f"{path}:0.6")
    assert_matches(got, reference(tiny, [(path, 0.6)]), base_image)


def test_lokr_under_lycoris_names_matches_the_same_update(tiny, tmp_path, base_image):
    """LyCORIS' own `lycoris_<module>` names (which diffusers does not read) against the ai-toolkit file."""
    lyco = write(lokr_state(tiny, LOKR_MODULES, "lycoris_", 8), tmp_path / "lyco.safetensors")
    same = write(lokr_state(tiny, LOKR_MODULES, "diffusion_model.", 8), tmp_path / "ait.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", str(lyco))
    assert_matches(got, reference(tiny, [(same, 1.0)]), base_image)


def test_text_encoder_keys_are_merged_into_qwen3(tiny, tmp_path, base_image):
    """diffusers loads no text-encoder LoRA for Z-Image: the reference gets the same adapter through peft on its
    Qwen3 text encoder, next to the transformer LoRA loaded by load_lora_weights."""
    pipe = ZImagePipeline.from_pretrained(str(tiny), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    inject_adapter_in_model(cfg, pipe.text_encoder)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / p.shape[1] ** 0.5)
    te = {f"lora_te_{k.removesuffix('.lora_A.weight').removesuffix('.lora_B.weight').replace('.', '_')}"
          f".lora_{'down' if '.lora_A.' in k else 'up'}.weight": v.contiguous()
          for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    sd, tcfg = peft_lora(tiny, ["to_q", "w2"], seed=10)
    transformer_only = write(dialect(sd, tcfg, "kohya"), tmp_path / "t.safetensors")
    both = write({**dialect(sd, tcfg, "kohya"), **te}, tmp_path / "both.safetensors")
    got = ours(tiny, tmp_path / "o.png", "--lora", str(both))
    expected = reference(tiny, [(transformer_only, 1.0)], pipe=pipe)
    without_te = ours(tiny, tmp_path / "o2.png", "--lora", str(transformer_only))
    assert np.abs(got - expected).max() <= 2
    assert np.abs(got - without_te).max() > 20  # the text-encoder part mattered


def test_merge_happens_in_float32_before_the_cast(tiny):
    """With --dtype bfloat16 each merged weight is (w + delta) rounded once, not w rounded, plus delta rounded."""
    sd, cfg = peft_lora(tiny, ["to_q"], seed=12, std=0.05)
    path = write(dialect(sd, cfg, "kohya"), Path(str(tiny) + "-lora") / "q.safetensors")
    try:
        loras = LoraSet([(read_lora(path, model_shapes(tiny)), 0.5)])
        model = load_transformer(tiny, torch.device("cpu"), torch.bfloat16, patch=loras.patch("transformer"))
        key = "layers.0.attention.to_q.weight"
        base = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))[key]
        down, up = sd[key.replace(".weight", ".lora_A.weight")], sd[key.replace(".weight", ".lora_B.weight")]
        delta = 0.5 * (cfg.lora_alpha / cfg.r) * (up @ down)
        got = model.state_dict()[key]
        once, twice = (base + delta).to(torch.bfloat16), base.to(torch.bfloat16) + delta.to(torch.bfloat16)
        assert (got == once).float().mean() > 0.999  # float32 summation order may flip a rare rounding tie
        assert (got == twice).float().mean() < 0.95  # what merging after the cast would give is measurably different
        assert loras.delta("transformer", key).dtype == torch.float32
        assert loras.delta("transformer", "layers.0.attention.to_k.weight") is None
    finally:
        shutil.rmtree(path.parent)


# ---------------------------------------------------------------------------------------------------- bad files

def generate(model: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["generate", "--model-path", str(model), "-p", PROMPT, "--width", str(SIZE),
                                    "--height", str(SIZE), "--num-steps", "2", "--seed", "1", "-o", str(out), *args])


FOREIGN = {
    "SDXL": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
    "Flux": ["transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj"],
    "Wan": ["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.cross_attn.k"],
}


@pytest.mark.parametrize("family", list(FOREIGN))
def test_lora_for_another_model_is_a_usage_error_naming_its_family(tiny, tmp_path, loads, family):
    state = {}
    for m in FOREIGN[family]:
        state |= {f"{m}.lora_down.weight": torch.zeros(4, 32), f"{m}.lora_up.weight": torch.zeros(32, 4)}
    path = write(state, tmp_path / "other.safetensors")
    before = snapshot(tmp_path)
    result = generate(tiny, tmp_path / "out" / "o.png", "--lora", str(path))
    assert_one_line_error(result, 2, "this LoRA does not fit Z-Image", f"its keys look like {family}")
    assert snapshot(tmp_path) == before and not loads


def test_lora_for_another_model_size_names_the_first_bad_key(checkpoints, tmp_path, loads):
    sd, cfg = peft_lora(checkpoints["wide"], ["to_q"])  # dim 128: the tiny model has dim 64
    path = save_diffusers(sd, cfg, tmp_path / "wide")
    result = generate(checkpoints["single"], tmp_path / "out" / "o.png", "--lora", str(path))
    line = assert_one_line_error(result, 2, "transformer.", ".attention.to_q.lora_", "another model size")
    assert "128" in line and "64" in line
    assert not (tmp_path / "out").exists() and not loads


@pytest.mark.parametrize("content,phrase", [(b"\x00\x01 not a safetensors file" * 8, "not a readable safetensors"),
                                            (b"", "not a readable safetensors")])
def test_unreadable_lora_file_is_a_usage_error(tiny, tmp_path, loads, content, phrase):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    result = generate(tiny, tmp_path / "out" / "o.png", "--lora", f"{path}:0.5")
    assert_one_line_error(result, 2, phrase, str(path))
    assert not (tmp_path / "out").exists() and not loads


class Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickled_lora_is_refused_without_being_loaded(tiny, tmp_path, loads, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(pickle.dumps({"lora_unet_layers_0_attention_to_q.lora_down.weight": Payload(marker)}))
    result = generate(tiny, tmp_path / "out" / "o.png", "--lora", str(path))
    assert_one_line_error(result, 2, "pickle", "never read", ".safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists() and not loads


@pytest.mark.parametrize("spec,phrase", [("missing.safetensors", "not found"), (":0.5", "names no file")])
def test_missing_lora_file_is_a_usage_error(tiny, tmp_path, loads, spec, phrase):
    result = generate(tiny, tmp_path / "out" / "o.png", "--lora", spec)
    assert_one_line_error(result, 2, phrase)
    assert not (tmp_path / "out").exists() and not loads


def test_lora_missing_a_part_is_a_usage_error(tiny, tmp_path, loads):
    path = write({"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 64)}, tmp_path / "a.safetensors")
    result = generate(tiny, tmp_path / "out" / "o.png", "--lora", str(path))
    assert_one_line_error(result, 2, "lora_unet_layers_0_attention_to_q.lora_down.weight", "no matching")
    assert not loads


def test_keys_that_match_nothing_are_a_warning_with_count_and_names(tiny, tmp_path):
    sd, cfg = peft_lora(tiny, ["to_q"])
    extra = {f"lora_unet_mystery_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(5)}
    path = write({**dialect(sd, cfg, "kohya"), **extra}, tmp_path / "mixed.safetensors")
    result = generate(tiny, tmp_path / "o.png", "--lora", str(path))
    assert result.exit_code == 0, result.output
    warning = [ln for ln in result.stderr.splitlines() if "match nothing" in ln]
    assert len(warning) == 1 and "5 key(s)" in warning[0] and "lora_unet_mystery_block_0" in warning[0]
    assert (tmp_path / "o.png").is_file()


# ---------------------------------------------------------------------------------------------------- runs

def test_from_png_reapplies_the_loras_and_refuses_changed_or_missing_files(tiny, tmp_path):
    sd, cfg = peft_lora(tiny, BLOCKS, seed=13)
    path = write(dialect(sd, cfg, "kohya"), tmp_path / "style.safetensors")
    first = ours(tiny, tmp_path / "first.png", "--lora", f"{path}:0.7")
    meta = json.loads(Image.open(tmp_path / "first.png").info["zimage"])
    assert meta["loras"] == [{"name": "style.safetensors", "path": str(path), "scale": 0.7,
                              "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest()}]
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "first.png"), "-o",
                                      str(tmp_path / "again.png"), "-q"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")).astype(int), first)
    assert np.abs(first - ours(tiny, tmp_path / "plain.png")).max() > 10

    write({**dialect(sd, cfg, "kohya"), "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(1.0)}, path)
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "first.png"), "-o",
                                      str(tmp_path / "changed.png")])
    assert_one_line_error(result, 2, "--from-png", str(path), "changed since the image was made")
    path.unlink()
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "first.png"), "-o",
                                      str(tmp_path / "gone.png")])
    assert_one_line_error(result, 2, "--from-png", str(path), "not there any more")
    assert not (tmp_path / "changed.png").exists() and not (tmp_path / "gone.png").exists()


def test_jsonl_loras_are_relative_to_the_file_and_each_set_is_merged_once(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "prompts"
    a = save_diffusers(*peft_lora(tiny, BLOCKS, seed=14), folder / "a")
    b = write(dialect(*peft_lora(tiny, ["to_v", "w1"], seed=15), "kohya"), folder / "b.safetensors")
    lines = [{"prompt": PROMPT, "seed": SEED, "loras": ["a/pytorch_lora_weights.safetensors:0.7"]},
             {"prompt": PROMPT, "seed": SEED, "loras": [{"path": "b.safetensors", "scale": 1.3},
                                                         "a/pytorch_lora_weights.safetensors:0.7"]},
             {"prompt": PROMPT, "seed": SEED},
             {"prompt": PROMPT, "seed": SEED, "loras": ["a/pytorch_lora_weights.safetensors:0.7"]},
             {"prompt": PROMPT, "seed": SEED, "loras": "a.safetensors"}]
    (folder / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    calls = {"transformer": 0, "text_encoder": 0}
    real_transformer, real_te = zimage.pipeline.load_transformer, zimage.pipeline.TextEncoder.load

    def count_transformer(*args, **kwargs):
        calls["transformer"] += 1
        return real_transformer(*args, **kwargs)

    def count_te(*args, **kwargs):
        calls["text_encoder"] += 1
        return real_te(*args, **kwargs)

    monkeypatch.setattr(zimage.pipeline, "load_transformer", count_transformer)
    monkeypatch.setattr(zimage.pipeline.TextEncoder, "load", count_te)
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompts-file", str(folder / "p.jsonl"),
                                      "--width", str(SIZE), "--height", str(SIZE), "-o", str(tmp_path / "{index}.png"),
                                      "-q"])
    assert result.exit_code == 1, result.output  # the last line is skipped
    assert "p.jsonl line 5" in result.stderr and "\"loras\" must be a list" in result.stderr
    assert calls == {"transformer": 3, "text_encoder": 1}  # three LoRA sets, none touching the text encoder
    monkeypatch.undo()
    img = {i: np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB")).astype(int) for i in range(4)}
    assert np.array_equal(img[0], img[3])
    assert np.array_equal(img[0], ours(tiny, tmp_path / "a.png", "--lora", f"{a}:0.7"))
    assert np.array_equal(img[1], ours(tiny, tmp_path / "ba.png", "--lora", f"{b}:1.3", "--lora", f"{a}:0.7"))
    assert np.array_equal(img[2], ours(tiny, tmp_path / "none.png"))


def test_jsonl_line_with_a_bad_lora_file_is_skipped_and_the_rest_run(tiny, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT, "loras": ["nowhere.safetensors:0.5"]}) + "\n" +
                                      json.dumps({"prompt": PROMPT, "loras": []}) + "\n")
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompts-file", str(tmp_path / "p.jsonl"),
                                      "--width", str(SIZE), "--height", str(SIZE), "--num-steps", "2", "-q",
                                      "-o", str(tmp_path / "out" / "{index}.png")])
    assert result.exit_code == 1, result.output
    assert f"skipped: p.jsonl line 1: LoRA file {tmp_path / 'nowhere.safetensors'} not found" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.png"]


def test_fused_qkv_in_some_blocks_and_split_in_others_and_redundant_fused_copies(tiny, tmp_path):
    """Block 0 as fused `qkv`, block 1 as split to_q/to_k/to_v plus a fused copy of garbage that trainers saving both
    spellings leave beside them: the split one wins there, as in diffusers."""
    sd, cfg = peft_lora(tiny, ["to_q", "to_k", "to_v"], seed=16)
    sd = {k: v for k, v in shared_down(sd).items() if k.startswith("layers.")}
    fused = fused_qkv(sd, cfg, dotted=False)
    state = {k: v for k, v in fused.items() if ".layers.0." in k}
    state |= {k: torch.randn(v.shape) if v.ndim else v for k, v in fused.items() if ".layers.1." in k}
    state |= {f"diffusion_model.{k}": v for k, v in sd.items() if k.startswith("layers.1.")}
    state |= {f"diffusion_model.{m}.alpha": torch.tensor(float(cfg.lora_alpha)) for m in modules(sd)
              if m.startswith("layers.1.")}
    loras = LoraSet([(read_lora(write(state, tmp_path / "mixed.safetensors"), model_shapes(tiny)), 1.0)])
    for m, (down, up) in modules(sd).items():
        expected = (cfg.lora_alpha / cfg.r) * (up @ down)
        assert torch.allclose(loras.delta("transformer", m + ".weight"), expected, atol=1e-6), m


def test_lora_on_a_single_file_transformer_in_the_original_layout_makes_the_folder_image(tiny, tmp_path):
    """The LoRA's keys map onto our module keys, whatever layout the transformer file has (fused qkv read as rows)."""
    from test_singlefile import folder_state, save, to_original_transformer

    original = save(to_original_transformer(folder_state(tiny, "transformer"), "model.diffusion_model."),
                    tmp_path / "z_image_turbo.safetensors")
    sd, cfg = peft_lora(tiny, BLOCKS + ["layers.1.adaLN_modulation.0"], seed=17)
    path = write(dialect(sd, cfg, "kohya"), tmp_path / "k.safetensors")
    folder = ours(tiny, tmp_path / "folder.png", "--lora", f"{path}:0.9")
    single = ours(tiny, tmp_path / "single.png", "--lora", f"{path}:0.9", "--transformer", str(original))
    assert np.array_equal(folder, single)
    assert np.abs(folder - ours(tiny, tmp_path / "plain.png", "--transformer", str(original))).max() > 10


def test_lora_is_merged_before_int8_quantization(tiny, tmp_path):
    sd, cfg = peft_lora(tiny, BLOCKS, seed=18)
    path = write(dialect(sd, cfg, "kohya"), tmp_path / "k.safetensors")
    quant_lora = ours(tiny, tmp_path / "ql.png", "--lora", str(path), "--quantize", "int8")
    quant_plain = ours(tiny, tmp_path / "q.png", "--quantize", "int8")
    full_lora = ours(tiny, tmp_path / "l.png", "--lora", str(path))
    assert np.abs(quant_lora - quant_plain).max() > 10  # the LoRA is in the quantized weights
    assert np.abs(quant_lora - full_lora).mean() < np.abs(quant_plain - full_lora).mean() / 3
