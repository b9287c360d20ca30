"""The single-file checkpoints other tools use (ComfyUI, stable-diffusion.cpp, Black Forest Labs' `ae.safetensors`):
their tensor names mapped to ours, and the configs their shapes imply.

Each mapping turns file tensor names into `Piece`s of our module keys and never reads tensor data, so that other
readers (GGUF files use the same original names) can reuse it with their own tensor reading. diffusers'
`loaders/single_file_utils.py` (convert_z_image_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint)
is the reference for the conversions.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable

from .transformer import TransformerConfig
from .vae import VAEConfig
from .weights import Piece, TensorInfo, WeightsError

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")  # LDM checkpoints and some repackaged files wrap the autoencoder
TEXT_ENCODER_PREFIXES = ("model.",)  # Qwen3ForCausalLM's, absent in files written from Qwen3Model

# original (Lumina-style) names -> diffusers', as whole leading or dotted segments
TRANSFORMER_HEADS = {"x_embedder.": "all_x_embedder.2-1.", "final_layer.": "all_final_layer.2-1."}
TRANSFORMER_PARTS = {".attention.out.": ".attention.to_out.0.", ".attention.q_norm.": ".attention.norm_q.",
                     ".attention.k_norm.": ".attention.norm_k."}
# the scales and markers of ComfyUI fp8 files: read with their weights by quant.read_scaled_fp8, never on their own
FP8_EXTRAS = {"scaled_fp8", "scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant"}
TRANSFORMER_SKIPPED = {"norm_final.weight"}  # in original checkpoints but unused by the model (diffusers drops it too)
QKV = ".attention.qkv."

# one tensor name each Z-Image component has in our names, to tell which component a file holds
HALLMARKS = {"transformer": "layers.0.adaLN_modulation.0.weight", "text_encoder": "embed_tokens.weight",
             "vae": "decoder.conv_in.weight"}
FLAGS = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae"}


def strip_prefix(name: str, prefixes: Iterable[str]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def transformer_pieces_of(name: str) -> dict[str, Piece]:
    """Our transformer key(s) for one tensor of a single file, in the original/ComfyUI layout (optionally under
    `model.diffusion_model.` or `diffusion_model.`) or in diffusers' names. A fused `attention.qkv.weight` gives
    three pieces, q, k and v in that order along dim 0. Unused tensors give none."""
    key = strip_prefix(name, TRANSFORMER_PREFIXES)
    if key in TRANSFORMER_SKIPPED or key.rsplit(".", 1)[-1] in FP8_EXTRAS:
        return {}
    for old, new in TRANSFORMER_HEADS.items():
        if key.startswith(old):
            key = new + key[len(old):]
    for old, new in TRANSFORMER_PARTS.items():
        key = key.replace(old, new)
    if QKV in key:
        head, tail = key.split(QKV)
        return {f"{head}.attention.to_{c}.{tail}": Piece(name, i, 3) for i, c in enumerate("qkv")}
    return {key: Piece(name)}


def text_encoder_pieces_of(name: str) -> dict[str, Piece]:
    """Our (Qwen3Model) key for one tensor of a Qwen3 file as ComfyUI ships it, with or without `model.`; the
    language-model head (tied to the embeddings in Qwen3-4B) is not used."""
    key = strip_prefix(name, TEXT_ENCODER_PREFIXES)
    return {} if key.startswith("lm_head.") or key.rsplit(".", 1)[-1] in FP8_EXTRAS else {key: Piece(name)}


BFL_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
BFL_SIMPLE = {"norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}


def vae_pieces_of(name: str, n_blocks: int) -> dict[str, Piece]:
    """Our (diffusers) key for one tensor of an autoencoder file in the original Black Forest Labs / LDM layout
    (`encoder.down.N.block.M`, `decoder.up.N...` numbered in reverse of our up blocks, `mid.block_1`,
    `mid.attn_1.q` as a 1x1 convolution...) or in diffusers' names. `n_blocks` is the number of resolution levels."""
    key = strip_prefix(name, VAE_PREFIXES)
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        return {key: Piece(name)}
    side, rest = m.groups()
    if m2 := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest):
        kind, level, j, tail = m2.groups()
        block = int(level) if kind == "down" else n_blocks - 1 - int(level)
        rest = f"{kind}_blocks.{block}.resnets.{j}.{tail.replace('nin_shortcut', 'conv_shortcut')}"
    elif m2 := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.(.+)", rest):
        kind, level, sampler, tail = m2.groups()
        block = int(level) if kind == "down" else n_blocks - 1 - int(level)
        rest = f"{kind}_blocks.{block}.{sampler}rs.0.{tail}"
    elif m2 := re.fullmatch(r"mid\.block_(\d)\.(.+)", rest):
        rest = f"mid_block.resnets.{int(m2[1]) - 1}.{m2[2].replace('nin_shortcut', 'conv_shortcut')}"
    elif m2 := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest):
        part, kind = m2.groups()
        return {f"{side}.mid_block.attentions.0.{BFL_ATTENTION[part]}.{kind}":
                Piece(name, squeeze=part != "norm" and kind == "weight")}
    elif m2 := re.fullmatch(r"(norm_out|conv_in|conv_out)\.(.+)", rest):
        rest = f"{BFL_SIMPLE[m2[1]]}.{m2[2]}"
    return {f"{side}.{rest}": Piece(name)}


def bfl_levels(names: Iterable[str]) -> int:
    """The number of resolution levels of a BFL-layout autoencoder: its highest `decoder.up.N` plus one."""
    levels = [int(m[1]) for n in names if (m := re.search(r"decoder\.up\.(\d+)\.", n))]
    return max(levels) + 1 if levels else 0


def pieces(component: str, header: dict[str, TensorInfo]) -> dict[str, Piece]:
    """Our module key -> piece, for every tensor of a single file holding `component` (transformer, text_encoder
    or vae). Two tensors that would fill the same key are an error."""
    if component == "vae":
        levels = bfl_levels(header)
        of = lambda n: vae_pieces_of(n, levels)  # noqa: E731
    else:
        of = transformer_pieces_of if component == "transformer" else text_encoder_pieces_of
    out: dict[str, Piece] = {}
    for name in header:
        for key, piece in of(name).items():
            if key in out:
                raise WeightsError(f"tensors '{out[key].name}' and '{name}' both hold '{key}'")
            out[key] = piece
    return out


def looks_like(header: dict[str, TensorInfo]) -> str | None:
    """Which Z-Image component a single file holds, judged from its names in any known layout; None for none."""
    for component, hallmark in HALLMARKS.items():
        if hallmark in pieces(component, header):
            return component
    return None


def fit_problem(component: str, header: dict[str, TensorInfo], flag_value: str) -> str | None:
    """Why a file given for `component` cannot be one (it holds another component, or another model); None
    when its names fit."""
    holds = looks_like(header)
    if holds == component:
        return None
    if holds is not None:
        return (f"{flag_value} holds a Z-Image {holds.replace('_', ' ')}, not a {component.replace('_', ' ')}: "
                f"give it as {FLAGS[holds]}")
    first = next(iter(header), "nothing")
    return (f"{flag_value} is not a Z-Image {component.replace('_', ' ')} in any layout zimage reads "
            f"(original/ComfyUI, diffusers{', Black Forest Labs' if component == 'vae' else ''}): "
            f"its {len(header)} tensors start with '{first}'")


def piece_shapes(header: dict[str, TensorInfo], found: dict[str, Piece]) -> dict[str, tuple[int, ...]]:
    """The shape each of our keys gets from its piece."""
    out = {}
    for key, p in found.items():
        shape = header[p.name].shape
        if p.parts > 1:
            shape = (shape[0] // p.parts, *shape[1:])
        out[key] = shape[:-2] if p.squeeze else shape
    return out


def count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered blocks `prefix.N.` the keys hold."""
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def infer_transformer(shapes: dict[str, tuple[int, ...]], base: TransformerConfig) -> TransformerConfig:
    """`base` with the sizes the tensors show (width, depth, heads, caption width, latent channels); the rest
    (RoPE axes, eps, scales) cannot be seen in shapes and stays `base`'s. Raises ValueError when they disagree."""
    given: dict = {}
    if (x := shapes.get("all_x_embedder.2-1.weight")) and len(x) == 2:
        patch = base.all_patch_size[0] ** 2 * base.all_f_patch_size[0]
        given.update(dim=x[0], in_channels=x[1] // patch)
    if n := count(shapes, "layers."):
        given["n_layers"] = n
    if n := count(shapes, "noise_refiner."):
        given["n_refiner_layers"] = n
    given["qk_norm"] = "layers.0.attention.norm_q.weight" in shapes
    dim = given.get("dim", base.dim)
    head_dim = shapes.get("layers.0.attention.norm_q.weight", (dim // base.n_heads,))[0]
    if head_dim and not dim % head_dim:
        given["n_heads"] = dim // head_dim
        if k := shapes.get("layers.0.attention.to_k.weight"):
            given["n_kv_heads"] = k[0] // head_dim
    if (c := shapes.get("cap_embedder.1.weight")) and len(c) == 2:
        given["cap_feat_dim"] = c[1]
    return replace(base, **given)


def infer_vae(shapes: dict[str, tuple[int, ...]], base: VAEConfig) -> VAEConfig:
    """`base` with the sizes the tensors show (channels per level, resnets per level, latent channels, attention,
    quant convs); the group count, scaling and shift stay `base`'s."""
    given: dict = {}
    channels = []
    while (w := shapes.get(f"encoder.down_blocks.{len(channels)}.resnets.0.conv1.weight")) is not None:
        channels.append(w[0])
    if channels:
        given["block_out_channels"] = tuple(channels)
    if n := count(shapes, "encoder.down_blocks.0.resnets."):
        given["layers_per_block"] = n
    for key, field, dim in (("encoder.conv_in.weight", "in_channels", 1),
                            ("decoder.conv_out.weight", "out_channels", 0),
                            ("decoder.conv_in.weight", "latent_channels", 1)):
        if (w := shapes.get(key)) is not None and len(w) > dim:
            given[field] = w[dim]
    given["mid_block_add_attention"] = "decoder.mid_block.attentions.0.to_q.weight" in shapes
    given["use_quant_conv"] = "quant_conv.weight" in shapes
    given["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    return replace(base, **given)


def infer_text_encoder(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The Qwen3 config values the tensors show: vocabulary, width, depth, heads, head width, MLP width."""
    given: dict = {}
    if (e := shapes.get("embed_tokens.weight")) and len(e) == 2:
        given.update(vocab_size=e[0], hidden_size=e[1])
    if n := count(shapes, "layers."):
        given["num_hidden_layers"] = n
    if (h := shapes.get("layers.0.self_attn.q_norm.weight")) and h[0]:
        given["head_dim"] = h[0]
        for key, field in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
            if w := shapes.get(f"layers.0.self_attn.{key}.weight"):
                given[field] = w[0] // h[0]
    if w := shapes.get("layers.0.mlp.gate_proj.weight"):
        given["intermediate_size"] = w[0]
    return given
