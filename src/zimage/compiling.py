"""torch.compile for the transformer blocks, with forward hooks (block streaming) left outside the graphs."""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(blocks: list[nn.Module], **options) -> None:
    """Compile each block's `forward`, not its `__call__`: hooks then run eagerly around the compiled graph, so the
    streamer's per-block hooks (with their stream, event and `.data` swaps) are never traced, and blocks of one
    kind share a graph instead of recompiling per block (dynamo stops at 8 recompiles). `uncompile` undoes it."""
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False, **options)


def uncompile(blocks: list[nn.Module]) -> None:
    """Drop the compiled `forward`s: each holds its block, a cycle that would keep released weights alive."""
    for block in blocks:
        block.__dict__.pop("forward", None)
