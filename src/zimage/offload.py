"""Keeping big modules off the accelerator: whole-model offload and block-by-block streaming."""

from __future__ import annotations

import torch
from torch import nn


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


class BlockStreamer:
    """Streams the weights of `blocks` from CPU memory to `device` one block at a time.

    Every other parameter of `model` lives on `device`. The blocks' weights stay in (pinned) CPU memory; before
    block i runs its weights are copied over, and block i + 1's copy is started on a side stream so the transfer
    overlaps the compute. After a block runs its device copy is dropped, so at most two blocks are resident.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device: torch.device):
        self.device = device
        self.blocks = blocks
        block_ids = {id(p) for b in blocks for p in b.parameters()}
        for p in model.parameters():
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        pin = device.type == "cuda"
        self.host = [[p.data.pin_memory() if pin else p.data for p in b.parameters()] for b in blocks]
        for i in range(len(blocks)):
            self._leave(i)  # drop the unpinned originals now, or the host would hold the blocks twice
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(b.register_forward_hook(lambda m, a, o, i=i: self._leave(i)))

    def _fetch(self, i: int) -> None:
        if i in self.ready or i >= len(self.blocks):
            return
        if self.stream is None:
            self.ready[i] = ([t.to(self.device, copy=True) for t in self.host[i]], None)
            return
        with torch.cuda.stream(self.stream):
            tensors = [t.to(self.device, non_blocking=True) for t in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = (tensors, event)

    def _enter(self, i: int) -> None:
        self._fetch(i)
        tensors, event = self.ready.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # the side stream allocated them; the main stream uses them
        for p, t in zip(self.blocks[i].parameters(), tensors):
            p.data = t
        self._fetch((i + 1) % len(self.blocks))

    def _leave(self, i: int) -> None:
        for p, t in zip(self.blocks[i].parameters(), self.host[i]):
            p.data = t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.ready.clear()
