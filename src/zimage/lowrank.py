"""Weight updates (LoRAs) computed beside a linear layer whose weight stays quantized: y = layer(x) + update(x).

A LoRA cannot go into a GGUF or scaled-fp8 weight without dequantizing it and quantizing it again, which gguf-py
cannot do for the K types, rounds the weight a second time, and costs the dequantize-quantize of every adapted
weight at load (measured in BENCHMARKS.md, "LoRA on quantized weights"). Instead each adapted layer gets a child
`lora` holding the update as two thin factors in the compute dtype, added to the layer's output by a forward hook:
the layer, its class and its parameter names stay as loaded (the factors are non-persistent buffers, so
`state_dict` keeps the checkpoint's keys), and one extra product of rank r costs little next to the layer's own.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .transformer import linear


class Updates(Protocol):
    """Weight updates of one component as loaders apply them (lora.LoraPatch): merged into a weight read as floats
    (`__call__`), or as factors beside a weight kept quantized (`factors`)."""

    keys: frozenset[str]

    def __call__(self, key: str, weight: Tensor) -> Tensor: ...

    def factors(self, key: str) -> tuple[Tensor | None, Tensor]: ...


class LowRank(nn.Module):
    """An update of a weight held as `up @ down` (out x r, r x in), or whole as `up` when `down` is None:
    forward(x) = x @ (up @ down)^T without ever making the product."""

    def __init__(self, down: Tensor | None, up: Tensor):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x if self.down is None else linear(x, self.down, None), self.up, None)

    def extra_repr(self) -> str:
        return "whole" if self.down is None else f"rank={self.down.shape[0]}"


def _plus_update(layer: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out + layer.lora(args[0])


def add_update(layer: nn.Module, update: LowRank) -> None:
    """Make `layer(x)` return its own output plus `update(x)`."""
    layer.add_module("lora", update)
    layer.register_forward_hook(_plus_update)


def add_updates(module: nn.Module, updates: Updates, kept: type[nn.Module], dtype: torch.dtype,
                device: torch.device) -> int:
    """Give every layer of type `kept` (the quantized linears) whose weight `updates` changes its update beside it,
    factors in `dtype` on `device`; returns how many. Weights of other layers were loaded as floats, with the
    update merged."""
    n, layers = 0, dict(module.named_modules())
    for key in sorted(updates.keys):
        layer = layers.get(key.removesuffix(".weight"))  # None: a layer not built (the text encoder's last)
        if isinstance(layer, kept):
            down, up = updates.factors(key)
            to = dict(device=device, dtype=dtype)
            add_update(layer, LowRank(None if down is None else down.to(**to), up.to(**to)))
            n += 1
    return n
