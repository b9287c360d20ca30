"""The key dialects of LoRA files, converted to our module keys at the border.

diffusers/PEFT (`transformer.<module>.lora_A.weight`), ai-toolkit (`diffusion_model.<module>`), musubi-tuner/kohya
(`lora_unet_<module with _ for .>.lora_down.weight`), LyCORIS (`lycoris_<module with _ for .>`), DiffSynth (bare
names, `lora_A.default.weight`), ComfyUI/original Z-Image names (fused `attention.qkv`, `attention.out`,
`x_embedder`, `final_layer`), and text-encoder keys (`lora_te_`, `text_encoder.`) for Qwen3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("transformer", "text_encoder")

# tensor name ending -> part of an adapted module; LoRA parts are named lora_down (in -> r) and lora_up (r -> out)
PART_SUFFIXES = {
    ".lora_A.default.weight": "lora_down", ".lora_B.default.weight": "lora_up",
    ".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up",
    ".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up",
    ".lora.down.weight": "lora_down", ".lora.up.weight": "lora_up",
    ".alpha": "alpha",
    **{f".{p}": p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
}
# prefixes naming the component, longest first; a key with none of them is a transformer key
PREFIXES = (
    ("text_encoder", ("text_encoders.qwen3_4b.transformer.", "text_encoder.", "lora_te1_", "lora_te_")),
    ("transformer", ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
                     "lora_unet_", "lycoris_", "unet.")),
)
# model families other tools' LoRAs are made for, told by key patterns (checked in order)
FAMILIES = (("Flux", r"double_blocks|single_blocks|single_transformer_blocks|context_embedder"),
            ("SD3", r"joint_blocks"),
            ("Qwen-Image", r"img_mod|txt_mlp|img_mlp"),
            ("SDXL", r"lora_te2_|text_encoder_2|input_blocks_[0-9]+_1_transformer_blocks|add_embedding"),
            ("Stable Diffusion 1.x/2.x/SDXL", r"down_blocks|up_blocks|input_blocks|output_blocks|mid_block"),
            ("Wan", r"blocks[._][0-9]+[._](self_attn|cross_attn)|[._]ffn[._]"),
            ("PixArt/Sana", r"adaln_single|caption_projection"),
            ("HunyuanVideo", r"double_stream|single_stream"),
            ("a CLIP/T5 text encoder", r"text_model|encoder[._]block"))


@dataclass(frozen=True)
class Target:
    """Where one adapted module's delta goes: our weight key, and which of `count` equal row chunks (fused q, k, v)."""

    key: str
    index: int = 0
    count: int = 1


def aliases(component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[Target, ...]]:
    """Every spelling of every adaptable (2-D weight) module of a component -> its targets."""
    table: dict[str, tuple[Target, ...]] = {}
    fused: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        names = [module]
        if component == "text_encoder":
            names.append("model." + module)
        else:
            names += original_names(module)
            if m := re.fullmatch(r"(.+\.attention)\.to_([qkv])", module):
                fused.setdefault(m[1] + ".qkv", [""] * 3)["qkv".index(m[2])] = key
        for name in names:
            table[name] = (Target(key),)
    for name, keys in fused.items():
        if all(keys):
            table[name] = tuple(Target(k, i, 3) for i, k in enumerate(keys))
    # kohya and musubi write module paths with every `.` as `_`; our names never collide that way
    table.update({name.replace(".", "_"): t for name, t in list(table.items())})
    return table


def original_names(module: str) -> list[str]:
    """The ComfyUI/original spellings of one of our transformer modules."""
    out = []
    if module.startswith("all_x_embedder."):
        out.append("x_embedder")
    if module.startswith("all_final_layer."):
        out.append("final_layer." + module.split(".", 2)[2])
    if module.endswith(".attention.to_out.0"):
        out += [module[: -len("to_out.0")] + "out", module[: -len(".0")]]
    return out


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a tensor name, or None when its ending is not an adapter part we merge."""
    for suffix, part in PART_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def locate(module: str, tables: dict[str, dict[str, tuple[Target, ...]]]) -> tuple[str, str, tuple[Target, ...]] | None:
    """(component, canonical name, targets) of a module name in any dialect, or None when nothing fits."""
    for component, prefixes in PREFIXES:
        for prefix in prefixes:
            if module.startswith(prefix):
                rest = module[len(prefix):]
                hit = tables[component].get(rest)
                return (component, rest, hit) if hit else None
    hit = tables["transformer"].get(module)
    return ("transformer", module, hit) if hit else None


def family(keys: list[str]) -> str:
    text = "\n".join(keys)
    for name, pattern in FAMILIES:
        if re.search(pattern, text):
            return name
    return "another model"
