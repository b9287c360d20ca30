"""Tiled VAE decoding: group norms that share the whole image's statistics across tiles, and the tiles' layout
and linear blending. Memory then follows the tile size instead of the image size."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

STAT_PASSES = 2  # statistics-measuring passes of a tiled decode before the one kept


class GroupNorm(nn.GroupNorm):
    """GroupNorm that can share statistics across the tiles of a tiled decode.

    It normalizes with `fixed` statistics when they are set, else with its input's own. While `owned` is set (the
    part of the current tile that no other tile owns, as fractions of the tile's height and width), it also adds
    the float32 moments of that part of its input (per group: mean, sum of squared deviations, count) into `totals`,
    from which `fix` makes the next statistics.
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps)
        self.owned: tuple[float, float, float, float] | None = None
        self.totals: tuple[Tensor, Tensor, int] | None = None
        self.fixed: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.owned is not None:
            self._accumulate(x)
        if self.fixed is None:
            return super().forward(x)
        mean, var = self.fixed
        g = x.float().reshape(x.shape[0], self.num_groups, -1)
        g = (g - mean[..., None]) * torch.rsqrt(var[..., None] + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (g.reshape(x.shape) * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)

    def _accumulate(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = self.owned
        part = x[..., round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        if part.numel() == 0:
            return
        g = part.float().reshape(x.shape[0], self.num_groups, -1)
        var, mean = torch.var_mean(g, dim=-1, correction=0)
        self.totals = merge_moments(self.totals, (mean, var * g.shape[-1], g.shape[-1]))

    def fix(self) -> None:
        """Normalize from now on with the mean and variance of everything accumulated, and start afresh."""
        mean, m2, n = self.totals
        self.fixed = (mean, (m2 / n).clamp_min(0))
        self.totals = None

    def reset(self) -> None:
        self.owned, self.totals, self.fixed = None, None, None


def merge_moments(a: tuple[Tensor, Tensor, int] | None, b: tuple[Tensor, Tensor, int]) -> tuple[Tensor, Tensor, int]:
    """Combine (mean, sum of squared deviations, count) of two parts (Chan et al.'s parallel update).

    Stable in float32, unlike sums of squares (which cancel catastrophically when the mean is large against the
    spread); MPS has no float64, so the statistics cannot simply be summed in double precision.
    """
    if a is None:
        return b
    (mean_a, m2_a, n_a), (mean_b, m2_b, n_b) = a, b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n), n


def blend_ramp(n: int, overlap: int, fade_in: bool, fade_out: bool, device: torch.device) -> Tensor:
    """Per-pixel weights along one side of a tile: linear ramps over the overlaps shared with neighbours."""
    ramp = torch.ones(n, device=device)
    steps = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
    if fade_in:
        ramp[:overlap] = steps
    if fade_out:
        ramp[n - overlap :] = steps.flip(0)
    return ramp


def owned_span(starts: list[int], i: int, tile: int) -> tuple[int, int]:
    """The part of tile i that it alone accounts for: overlaps are split at their middle."""
    lo = 0 if i == 0 else (starts[i] + starts[i - 1] + tile) // 2
    hi = starts[i] + tile if i == len(starts) - 1 else (starts[i + 1] + starts[i] + tile) // 2
    return lo, hi


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` covering `size`, `stride` apart, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_tiles(upsample: Callable[[Tensor], Tensor], h: Tensor, recorders: list[GroupNorm], tile: int, overlap: int,
                scale: int, out_channels: int) -> Tensor:
    """`upsample` run on overlapping tiles of latent-resolution features h, blended linearly into one image; each
    of `recorders` accumulates the statistics of the part each tile owns."""
    s = scale
    b, _, height, width = h.shape
    out = torch.zeros(b, out_channels, height * s, width * s, device=h.device)
    weight = torch.zeros(1, 1, height * s, width * s, device=h.device)
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, tile, tile - overlap), tile_starts(width, tile, tile - overlap)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            (oy0, oy1), (ox0, ox1) = owned_span(ys, i, th), owned_span(xs, j, tw)
            for m in recorders:
                m.owned = ((oy0 - y) / th, (oy1 - y) / th, (ox0 - x) / tw, (ox1 - x) / tw)
            piece = upsample(h[:, :, y : y + th, x : x + tw]).float()
            wy = blend_ramp(th * s, overlap * s, y > 0, y + th < height, h.device)
            wx = blend_ramp(tw * s, overlap * s, x > 0, x + tw < width, h.device)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * s : (y + th) * s, x * s : (x + tw) * s] += piece * mask
            weight[:, :, y * s : (y + th) * s, x * s : (x + tw) * s] += mask
    for m in recorders:
        m.owned = None
    return out / weight


def decode_tiles(upsample: Callable[[Tensor], Tensor], h: Tensor, norms: list[GroupNorm], tile: int, overlap: int,
                 scale: int, out_channels: int) -> Tensor:
    """Blend `upsample` over tiles of h with the group norms `norms` normalizing by whole-image statistics,
    measured over STAT_PASSES passes (each tile contributing the region it owns) before the pass that is kept."""
    try:
        for _ in range(STAT_PASSES):
            blend_tiles(upsample, h, norms, tile, overlap, scale, out_channels)
            for m in norms:
                m.fix()
        return blend_tiles(upsample, h, [], tile, overlap, scale, out_channels)
    finally:
        for m in norms:
            m.reset()
