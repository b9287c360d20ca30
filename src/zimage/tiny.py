"""Small random checkpoints in the published Z-Image layout, for tests, CI and smoke runs without real weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .scheduler import SchedulerConfig
from .transformer import TransformerConfig, ZImageTransformer
from .vae import AutoencoderKL, VAEConfig
from .weights import WEIGHT_STEMS, save_weights

# Qwen3's chat template, reduced to what prompts need: system/user/assistant turns and the generation prompt,
# with the empty think block that `enable_thinking=False` adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = (
    "a photo of a cat sitting on a red chair in the sun, highly detailed. "
    "A watercolor painting of mountains at dawn with mist over the lake. "
    "portrait of an old man, studio lighting, 85mm lens, sharp focus. "
    "Neon city street at night in the rain, reflections, cinematic. "
    "the quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()[]{}<>-_+=*/\\|@#$%^&~`"
)


@dataclass(frozen=True)
class TinySpec:
    """Shapes of a tiny checkpoint. The defaults are small enough for a CPU test in well under a second."""

    dim: int = 64
    n_layers: int = 2
    n_refiner_layers: int = 1
    n_heads: int = 2
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    te_hidden: int = 48
    te_layers: int = 3
    te_heads: int = 4
    te_kv_heads: int = 2
    te_intermediate: int = 96
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    vae_groups: int = 8
    vocab_merges: int = 200
    shards: int = 1  # >1 writes every component as shards plus an index
    te_prefix: bool = True  # text encoder keys under `model.` as published (Qwen3ForCausalLM)
    dynamic_shift: bool = False
    shift: float = 3.0
    transformer_dtype: torch.dtype = torch.float32  # as published
    te_dtype: torch.dtype = torch.bfloat16  # as published
    vae_dtype: torch.dtype = torch.float32
    seed: int = 0

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(dim=self.dim, n_layers=self.n_layers, n_refiner_layers=self.n_refiner_layers,
                                 n_heads=self.n_heads, n_kv_heads=self.n_heads, cap_feat_dim=self.te_hidden,
                                 axes_dims=self.axes_dims, axes_lens=self.axes_lens)

    def vae_config(self) -> VAEConfig:
        return VAEConfig(block_out_channels=self.vae_channels, norm_num_groups=self.vae_groups)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(shift=self.shift, use_dynamic_shifting=self.dynamic_shift)


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights with unit-scale activations, and norms and pad tokens away from their init values so that
    a swapped or skipped tensor shows up in parity tests."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and "pad_token" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) if "pad_token" in name
                        else 0.02 * torch.randn(p.shape, generator=gen))


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items()}


def write_tokenizer(folder: Path, merges: int) -> int:
    """A byte-level BPE trained on a small corpus, saved as a Qwen2 tokenizer with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + merges, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([CORPUS] * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges_pairs)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 131072
    tok.save_pretrained(str(folder))
    # the published tokenizer_config.json carries the chat template itself
    config_path, template_path = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if template_path.exists():
        config = json.loads(config_path.read_text())
        config["chat_template"] = template_path.read_text()
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        template_path.unlink()
    if not (folder / "vocab.json").exists():  # the published folder carries the BPE files beside tokenizer.json
        (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges_pairs) + "\n")
    return len(tok)


def write_text_encoder(folder: Path, spec: TinySpec, vocab_size: int, gen: torch.Generator) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=spec.te_hidden, intermediate_size=spec.te_intermediate,
                      num_hidden_layers=spec.te_layers, num_attention_heads=spec.te_heads,
                      num_key_value_heads=spec.te_kv_heads, head_dim=spec.te_hidden // spec.te_heads,
                      max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(cfg)
    randomize(model, gen)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}  # tied to embed_tokens
    if not spec.te_prefix:
        state = {k.removeprefix("model."): v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    save_weights(cast(state, spec.te_dtype), folder, WEIGHT_STEMS["text_encoder"], spec.shards)


def write_model_index(path: Path) -> None:
    index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    path.write_text(json.dumps(index, indent=2))


MARKER = ".zimage-tiny"  # written into every tiny checkpoint: the only folders make_tiny will ever replace


class NotReplaceable(Exception):
    """The target of make_tiny exists and is not a tiny checkpoint that zimage wrote."""


def replaceable_problem(out: Path) -> str | None:
    """Why `out` must not be replaced by a tiny checkpoint; None when it is absent, an empty folder, or a tiny
    checkpoint zimage wrote (it carries the marker file)."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink() or not out.is_dir():
        return f"{out} exists and is not a folder; refusing to replace it"
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return None
    return (f"{out} exists and is not a tiny checkpoint written by zimage make-tiny; refusing to replace it "
            "(choose another folder)")


def make_tiny(out: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random checkpoint of the given shapes to `out` in the published Z-Image layout.

    Replaces `out` only when it is empty or an earlier tiny checkpoint (never a real download); otherwise raises
    NotReplaceable and touches nothing."""
    out = Path(out)
    if problem := replaceable_problem(out):
        raise NotReplaceable(problem)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("a random checkpoint written by `zimage make-tiny`; safe to replace\n")
    gen = torch.Generator().manual_seed(spec.seed)
    write_model_index(out / "model_index.json")

    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler_config().to_json(), indent=2))

    vocab_size = write_tokenizer(out / "tokenizer", spec.vocab_merges)
    write_text_encoder(out / "text_encoder", spec, vocab_size, gen)

    tcfg = spec.transformer_config()
    transformer = ZImageTransformer(tcfg)
    randomize(transformer, gen)
    (out / "transformer").mkdir()
    (out / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "ZImageTransformer2DModel", **tcfg.to_json()}, indent=2))
    save_weights(cast(transformer.state_dict(), spec.transformer_dtype), out / "transformer",
                 WEIGHT_STEMS["transformer"], spec.shards)

    vcfg = spec.vae_config()
    vae = AutoencoderKL(vcfg)
    randomize(vae, gen)
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **vcfg.to_json()}, indent=2))
    save_weights(cast(vae.state_dict(), spec.vae_dtype), out / "vae", WEIGHT_STEMS["vae"], 1)
    return out
