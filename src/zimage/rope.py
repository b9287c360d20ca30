"""Z-Image's 3D rotary position embedding: per-axis angle tables, looked up by (frame, row, column) ids.

Rotations are carried as float32 cos and sin (no complex or float64 tensor ever reaches an accelerator: Inductor's
CUDA code generation breaks on complex64 and MPS has no float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Rope(NamedTuple):
    """RoPE rotations as float32 cos and sin of the angles, (..., head_dim/2) each; on the CPU also as unit complex
    numbers `cis` (cos + i sin), made once per size for the CPU kernel."""

    cos: Tensor
    sin: Tensor
    cis: Tensor | None = None

    def cat(self, other: "Rope", dim: int) -> "Rope":
        return with_cis(Rope(torch.cat([self.cos, other.cos], dim), torch.cat([self.sin, other.sin], dim)))

    def expand(self, *shape: int) -> "Rope":
        return Rope(self.cos.expand(*shape), self.sin.expand(*shape),
                    None if self.cis is None else self.cis.expand(*shape))


def with_cis(rope: Rope) -> Rope:
    """`rope` with its complex form when it lives on the CPU (the only place the complex kernel runs)."""
    if rope.cos.device.type != "cpu":
        return rope
    return Rope(rope.cos, rope.sin, torch.complex(rope.cos, rope.sin))


def rotate_real(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, H, S, D) by the angles of `rope` (B, 1, S, D/2), in float32,
    with real arithmetic only (what Inductor's GPU code generation and MPS handle)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = pairs * rope.cos[..., None]
    out[..., 0].addcmul_(x1, rope.sin, value=-1)
    out[..., 1].addcmul_(x0, rope.sin)
    return out.flatten(-2).type_as(x)


def rotate_complex(x: Tensor, rope: Rope) -> Tensor:
    """The same rotation as one complex multiply: on the CPU a single fused kernel, 3-6x faster than the real
    ops (BENCHMARKS.md)."""
    rotation = torch.complex(rope.cos, rope.sin) if rope.cis is None else rope.cis
    out = torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rotation)
    return out.flatten(-2).type_as(x)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, H, S, D) by `rope` (B, 1, S, D/2), in float32: complex
    arithmetic only in eager CPU runs, real arithmetic on GPUs and under torch.compile."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return rotate_complex(x, rope)
    return rotate_real(x, rope)


def rope_angles(theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]) -> list[Tensor]:
    """Per-axis float32 tables (axes_lens[i], axes_dims[i]/2) of position * frequency, computed on the CPU in
    float64 as the reference does (angles reach 1535 rad, where float32 products would be off by 1e-4)."""
    tables = []
    for d, n in zip(axes_dims, axes_lens):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
        tables.append(torch.outer(torch.arange(n, dtype=torch.float64, device="cpu"), freqs).float())
    return tables


class RopeTables:
    """Per-axis cos and sin tables of the 3D RoPE, built once per device, indexed by position ids. Only float32
    reaches the device: the float64 angles stay on the CPU (MPS has no float64)."""

    def __init__(self, theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]):
        self.axes = (theta, tuple(axes_dims), tuple(axes_lens))
        self._tables: dict[torch.device, list[Rope]] = {}

    def _build(self, device: torch.device) -> list[Rope]:
        return [Rope(a.cos().to(device), a.sin().to(device)) for a in rope_angles(*self.axes)]

    def __call__(self, ids: Tensor) -> Rope:
        """Rotations of shape (*ids.shape[:-1], head_dim/2) for integer position ids (..., 3)."""
        if ids.device not in self._tables:
            self._tables[ids.device] = self._build(ids.device)
        tables = self._tables[ids.device]
        return with_cis(Rope(*(torch.cat([getattr(t, part)[ids[..., i]] for i, t in enumerate(tables)], dim=-1)
                               for part in ("cos", "sin"))))
