"""Caption features: the Qwen3 text encoder from transformers, run on the real prompt tokens only."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, Qwen3Model

from .modelfiles import ModelFiles, component
from .weights import Patch, expected_shapes, match_pieces

log = logging.getLogger("zimage")

MAX_TOKENS = 512  # the reference's max_sequence_length


def encoder_config(full):
    """The Qwen3 config cut to the layers whose output Z-Image uses.

    Z-Image reads hidden_states[-2], the output of the second-to-last layer before the final norm, so the last
    layer and the norm are never run and never loaded.
    """
    cfg = copy.deepcopy(full)
    cfg.num_hidden_layers -= 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    cfg._attn_implementation = "sdpa"
    return cfg


class TextEncoder:
    """Tokenizer + truncated Qwen3. `encode` turns prompts into caption features, one (L, hidden) tensor each."""

    def __init__(self, model: Qwen3Model, tokenizer, max_tokens: int = MAX_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, source: ModelFiles | Path, device: torch.device, dtype: torch.dtype,
             quantize: str = "none", patch: Patch | None = None) -> "TextEncoder":
        """Qwen3 from a checkpoint folder or the ModelFiles of a run (a single file with or without `model.`, a
        llama.cpp GGUF kept quantized), with the tokenizer of the folder or of `--tokenizer`; its linear weights
        quantized to `quantize` (int8, fp8) while loading unless none; `patch` edits weights as they load, before
        any quantization (see weights.read_pieces)."""
        files = ModelFiles.of(source)
        comp = component(files, "text_encoder")
        with torch.device("meta"):  # the whole model's shapes are checked, the last layer included
            match_pieces(comp.header, expected_shapes(Qwen3Model(comp.config)), comp.pieces, comp.configured_by,
                         comp.where)
        cfg = encoder_config(comp.config)
        with torch.device("meta"):
            model = Qwen3Model(cfg)
        model.norm = nn.Identity()
        from .quant import load_weights_of

        load_weights_of(model, comp, dtype, device, quantize, patch, "text encoder")
        model.rotary_emb = type(model.rotary_emb)(config=cfg).to(device)  # its buffers were left on meta
        tokenizer = AutoTokenizer.from_pretrained(str(files.tokenizer_dir()))
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def template(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True)

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of the templated prompt, cut to the 512-token limit with a warning saying how many were cut."""
        ids = self.tokenizer(self.template(prompt))["input_ids"]
        if len(ids) > self.max_tokens:
            log.warning("prompt is %d tokens long; the last %d were cut (limit %d): %.60s...",
                        len(ids), len(ids) - self.max_tokens, self.max_tokens, prompt)
            ids = ids[: self.max_tokens]
        return ids

    @torch.inference_mode()
    def encode(self, prompts: list[str], batch_size: int = 8) -> list[Tensor]:
        """Caption features for each prompt: (real tokens, hidden) in the model's dtype on its device.

        Prompts run unpadded, or right-padded with a mask when batched; causal attention makes both equal to
        the reference's 512-padded run on the real tokens.
        """
        token_ids = [self.tokenize(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
        out: list[Tensor | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(token_ids[i]) for i in chunk)
            ids = torch.zeros(len(chunk), longest, dtype=torch.long)
            mask = torch.zeros(len(chunk), longest, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[row, : len(token_ids[i])] = 1
            padded = any(len(token_ids[i]) < longest for i in chunk)
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device) if padded else None,
                                use_cache=False).last_hidden_state
            for row, i in enumerate(chunk):
                out[i] = hidden[row, : len(token_ids[i])].clone()
        return out
