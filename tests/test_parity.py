"""Parity with the reference implementation (diffusers 0.42 ZImagePipeline) on tiny random checkpoints.

Every model here is loaded from files in the published layout by the same code users run.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from PIL import Image
from typer.testing import CliRunner

from zimage.cli import app
from zimage.pipeline import load_transformer, load_vae
from zimage.scheduler import SchedulerConfig, get_sigmas, model_times
from zimage.text_encoder import TextEncoder
from zimage.transformer import TransformerConfig, ZImageTransformer
from zimage.vae import AutoencoderKL, VAEConfig

CPU = torch.device("cpu")
NAMES = ["single", "sharded", "wide"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def reference(checkpoints):
    """The reference pipeline for each tiny checkpoint, float32 on the CPU, loaded once."""
    pipes = {}
    for name, path in checkpoints.items():
        pipe = ZImagePipeline.from_pretrained(str(path), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("latent_hw,cap_lens", [((8, 8), [7]), ((6, 10), [1, 33, 70]), ((12, 4), [32, 31])])
@torch.inference_mode()
def test_transformer_output_matches_reference(checkpoints, reference, name, latent_hw, cap_lens):
    ours = load_transformer(checkpoints[name], CPU, torch.float32)
    ref = reference[name].transformer
    gen = torch.Generator().manual_seed(len(cap_lens))
    b = len(cap_lens)
    x = torch.randn(b, 16, *latent_hw, generator=gen)
    t = torch.rand(b, generator=gen)
    caps = [torch.randn(n, ours.cfg.cap_feat_dim, generator=gen) for n in cap_lens]
    expected = torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]).squeeze(2)
    got = ours(x, t, caps)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_vae_decode_matches_reference(checkpoints, reference, name):
    ours = load_vae(checkpoints[name], CPU, torch.float32)
    ref = reference[name].vae
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    expected = ref.decode(latents / ref.config.scaling_factor + ref.config.shift_factor, return_dict=False)[0]
    got = ours.decode(latents)
    assert got.shape == (2, 3, 48, 80)
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_vae_encode_matches_reference(checkpoints, reference, name):
    ours = load_vae(checkpoints[name], CPU, torch.float32)
    ref = reference[name].vae
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean = ref.encode(images).latent_dist.mean
    expected = (mean - ref.config.shift_factor) * ref.config.scaling_factor
    assert rel_err(ours.encode(images), expected) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_caption_features_match_reference(checkpoints, reference, name):
    encoder = TextEncoder.load(checkpoints[name], CPU, torch.float32)
    prompts = ["a cat", "A watercolor painting of mountains at dawn, with mist over the lake and a red boat", ""]
    expected, _ = reference[name].encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    got = encoder.encode(prompts, batch_size=2)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= 1e-4


@torch.inference_mode()
def test_long_prompt_is_cut_at_512_tokens_with_a_warning(tiny, reference, caplog):
    encoder = TextEncoder.load(tiny, CPU, torch.float32)
    prompt = "portrait of an old man, studio lighting, sharp focus. " * 60
    with caplog.at_level(logging.WARNING, logger="zimage"):
        (got,) = encoder.encode([prompt])
    full = len(encoder.tokenizer(encoder.template(prompt))["input_ids"])
    assert full > 512 and got.shape[0] == 512
    assert f"the last {full - 512} were cut" in caplog.text
    expected, _ = reference["single"].encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)
    assert rel_err(got, expected[0]) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_sigmas_and_times_match_reference_for_1_to_50_steps(checkpoints, name):
    folder = checkpoints[name] / "scheduler"
    cfg = SchedulerConfig.from_json(folder / "scheduler_config.json")
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
    for seq_len in (16, 256, 1024, 4096):
        mu = calculate_shift(seq_len, ref.config.get("base_image_seq_len", 256), ref.config.get("max_image_seq_len", 4096),
                             ref.config.get("base_shift", 0.5), ref.config.get("max_shift", 1.15))
        for n in range(1, 51):
            ref.set_timesteps(n, sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=mu)
            sigmas = get_sigmas(cfg, n, seq_len)
            assert (sigmas - ref.sigmas).abs().max().item() <= 1e-6
            assert (model_times(cfg, sigmas) - (1000 - ref.timesteps) / 1000).abs().max().item() <= 1e-6


def test_both_shift_modes_are_covered(checkpoints):
    modes = {SchedulerConfig.from_json(p / "scheduler" / "scheduler_config.json").use_dynamic_shifting
             for p in checkpoints.values()}
    assert modes == {True, False}


def test_turbo_schedule_is_the_published_eight_passes():
    sigmas = get_sigmas(SchedulerConfig(shift=3.0), 8, 4096)
    published = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert sigmas.tolist() == pytest.approx(published, abs=1e-4)


CASES = {
    "no-cfg-square": dict(width=128, height=128, negative=None, guidance=None),
    "negative-prompt-nonsquare": dict(width=96, height=160, negative="blurry, low quality", guidance=None),
    "cfg-no-negative-nonsquare": dict(width=192, height=64, negative=None, guidance=3.0),
    "cfg-normalized-truncated": dict(width=128, height=96, negative="dark", guidance=4.0, norm=1.1, trunc=0.6),
}


def reference_image(pipe, prompt, seed, case) -> np.ndarray:
    guidance = case["guidance"] if case["guidance"] is not None else (5.0 if case["negative"] else 0.0)
    image = pipe(prompt=prompt, negative_prompt=case["negative"], width=case["width"], height=case["height"],
                 num_inference_steps=8, guidance_scale=guidance, cfg_normalization=case.get("norm", 0.0),
                 cfg_truncation=case.get("trunc", 1.0), generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_generated_png_matches_reference_pipeline(checkpoints, reference, tmp_path, name, case_name):
    case, prompt, seed = CASES[case_name], "a red fox in the snow", 1234
    out = tmp_path / "out.png"
    args = ["generate", "--model-path", str(checkpoints[name]), "--prompt", prompt, "--width", str(case["width"]),
            "--height", str(case["height"]), "--seed", str(seed), "--output", str(out), "-q", "--dtype", "float32"]
    if case["negative"] is not None:
        args += ["--negative-prompt", case["negative"]]
    if case["guidance"] is not None:
        args += ["--guidance-scale", str(case["guidance"])]
    if "norm" in case:
        args += ["--cfg-normalization", str(case["norm"]), "--cfg-truncation", str(case["trunc"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    expected = reference_image(reference[name], prompt, seed, case)
    assert ours.shape == expected.shape == (case["height"], case["width"], 3)
    assert np.abs(ours - expected).max() <= 2
    assert ours.std() > 5  # a real picture, not a flat one


def test_batch_of_images_matches_reference_batch(tiny, reference, tmp_path):
    prompts, seed = ["a cat", "a lighthouse on a cliff at night"], 7
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "--prompt", prompts[0], "--prompt",
                                      prompts[1], "--width", "64", "--height", "96", "--seed", str(seed),
                                      "--batch-size", "2", "--output", str(tmp_path / "img.png"), "-q",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(2)]
    images = reference["single"](prompt=prompts, width=64, height=96, num_inference_steps=8, guidance_scale=0.0,
                                 generator=gens).images
    for k, expected in enumerate(images):
        ours = np.asarray(Image.open(tmp_path / f"img-{k:04d}.png").convert("RGB")).astype(int)
        assert np.abs(ours - np.asarray(expected).astype(int)).max() <= 2


PUBLISHED_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                             n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                             cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                             axes_lens=[1536, 512, 512])
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, act_fn="silu", down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_transformer_has_the_reference_names_shapes_and_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(PUBLISHED_TRANSFORMER))
    with torch.device("meta"):
        ours = ZImageTransformer(TransformerConfig.from_json(tmp_path / "config.json"))
        ref = ZImageTransformer2DModel(**PUBLISHED_TRANSFORMER)
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == 6_154_908_736


def test_flux_vae_has_the_reference_names_and_shapes(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(FLUX_VAE))
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.from_json(tmp_path / "config.json"))
        ref = RefVAE(**FLUX_VAE)
    assert shapes(ours) == shapes(ref)
    assert math.isclose(ours.cfg.scaling_factor, 0.3611) and math.isclose(ours.cfg.shift_factor, 0.1159)
