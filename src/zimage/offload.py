"""Keeping big modules off the accelerator: whole-model offload and block-by-block streaming."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

log = logging.getLogger("zimage")

ALIGN = 64  # byte alignment of each tensor inside a block's flat buffer (any dtype's views stay aligned)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def pinned_buffer(nbytes: int) -> Tensor:
    """A page-locked byte buffer of exactly `nbytes`: ordinary memory registered with CUDA, because PyTorch's
    pinned allocator rounds every allocation up to a power of two (11.4 GiB of blocks would take ~17 GiB).
    Falls back to pageable memory (slower, synchronous copies) when the driver refuses to pin it."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
    except Exception as e:  # noqa: BLE001  (e.g. a memlock limit): streaming still works, unpinned
        log.debug("could not pin %d bytes (%s); streaming from pageable memory", nbytes, e)
    return buf


def unpin(buf: Tensor) -> None:
    """Undo `pinned_buffer`'s registration (the memory itself is freed when its last view is)."""
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(buf.data_ptr()))
    except Exception:  # noqa: BLE001  it was never registered
        pass


@dataclass(frozen=True)
class StreamOps:
    """The CUDA stream and event calls the streamer makes, gathered so tests can stand in for them."""

    new_stream: Callable[[torch.device], Any] = torch.cuda.Stream
    new_event: Callable[[], Any] = torch.cuda.Event
    use: Callable[[Any], ContextManager] = torch.cuda.stream
    current: Callable[[torch.device], Any] = torch.cuda.current_stream
    record: Callable[[Tensor, Any], None] = Tensor.record_stream


def layout(tensors: list[Tensor]) -> tuple[list[int], int]:
    """Byte offsets of `tensors` packed into one buffer, each aligned to ALIGN, and the buffer's exact size."""
    offsets, size = [], 0
    for t in tensors:
        size += -size % ALIGN
        offsets.append(size)
        size += t.numel() * t.element_size()
    return offsets, size


def views(flat: Tensor, like: list[Tensor], offsets: list[int]) -> list[Tensor]:
    """Tensors shaped and typed like `like`, over `flat` (a byte buffer) at `offsets`."""
    return [flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(like, offsets)]


class BlockStreamer:
    """Streams the weights of `blocks` from CPU memory to `device` one block at a time.

    Every other parameter and buffer of `model` is moved to `device`. With `pin` (the default on CUDA), each
    block's weights are copied into one exactly sized page-locked buffer, block by block, the originals dropped
    as it goes, so host memory never holds a block twice. Before block i runs, its buffer is copied to the device in
    one transfer and block i + 1's copy is started on a side stream (`streams`, the default on CUDA) to overlap
    the compute; the compute stream waits for the copy's event. After a block runs its device copy is dropped, so
    at most two blocks are resident. `remove` must be called when done: the hooks and blocks form a cycle.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device: torch.device,
                 pin: Callable[[int], Tensor] | None | bool = True, streams: StreamOps | None | bool = True):
        cuda = device.type == "cuda"
        self.device = device
        self.blocks = blocks
        self.pin = (pinned_buffer if cuda else None) if pin is True else (pin or None)
        self.streams = (StreamOps() if cuda else None) if streams is True else (streams or None)
        in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in in_blocks:
                t.data = t.data.to(device)
        for b in blocks:
            for t in b.buffers():
                t.data = t.data.to(device)
        self.params = [list(b.parameters()) for b in blocks]
        self.layouts = [layout(ps) for ps in self.params]
        self.flat: list[Tensor | None] = [self._pack(i) for i in range(len(blocks))]
        self.host = [[p.data for p in ps] for ps in self.params]
        self.side = self.streams.new_stream(device) if self.streams else None
        self.ready: dict[int, tuple[list[Tensor], Any]] = {}
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(b.register_forward_hook(lambda m, a, o, i=i: self._leave(i)))

    def _pack(self, i: int) -> Tensor | None:
        """Move block i's weights into one flat host buffer (pinned with `pin`); its originals go at once."""
        if self.pin is None:
            return None
        offsets, size = self.layouts[i]
        flat = self.pin(size)
        for p, v in zip(self.params[i], views(flat, [p.data for p in self.params[i]], offsets)):
            v.copy_(p.data)
            p.data = v  # the original storage has no other owner: it is freed here, before the next block
        return flat

    def _fetch(self, i: int) -> None:
        if i in self.ready or i >= len(self.blocks):
            return
        flat = self.flat[i]
        if self.side is None:
            tensors = ([t.to(self.device, copy=True) for t in self.host[i]] if flat is None else
                       views(flat.to(self.device, copy=True), self.host[i], self.layouts[i][0]))
            self.ready[i] = (tensors, None)
            return
        with self.streams.use(self.side):
            if flat is None:
                copies = [t.to(self.device, non_blocking=True, copy=True) for t in self.host[i]]
            else:
                copies = [flat.to(self.device, non_blocking=True, copy=True)]
            event = self.streams.new_event()
            event.record(self.side)
        self.ready[i] = (copies, event)

    def _enter(self, i: int) -> None:
        self._fetch(i)
        tensors, event = self.ready.pop(i)
        if event is not None:
            current = self.streams.current(self.device)
            current.wait_event(event)  # the weights are used only once their copy has landed
            for t in tensors:
                self.streams.record(t, current)  # the side stream allocated them; the main stream uses them
            if self.flat[i] is not None:
                tensors = views(tensors[0], self.host[i], self.layouts[i][0])
        for p, t in zip(self.params[i], tensors):
            p.data = t
        self._fetch((i + 1) % len(self.blocks))

    def _leave(self, i: int) -> None:
        for p, t in zip(self.params[i], self.host[i]):
            p.data = t

    def remove(self) -> None:
        """Take the hooks off and drop every device copy; the blocks keep their host weights."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.side is not None:
            self.side.synchronize()  # a prefetch may still be reading a buffer that is about to be unpinned
        self.ready.clear()
        for i in range(len(self.blocks)):
            self._leave(i)
        if self.pin is pinned_buffer:
            for flat in self.flat:
                unpin(flat)
        self.flat, self.host, self.params, self.blocks = [], [], [], []
