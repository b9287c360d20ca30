"""The update each kind of adapter module makes (LoRA, LoHa, LoKr): whole, for merging into a weight, or as two
thin factors, for computing beside a weight kept quantized (lowrank.py). Always float32."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .lora_keys import Target

if TYPE_CHECKING:
    from .lora import Module


def lora_factors(m: Module, read: Callable[[str], Tensor], target: Target) -> tuple[Tensor, Tensor, float]:
    """(down, up rows of `target`, alpha/rank) of a plain LoRA module, in float32."""
    down, up = read(m.parts["lora_down"]).flatten(1), read(m.parts["lora_up"]).flatten(1)
    if target.count > 1:
        n = up.shape[0] // target.count
        up = up[target.index * n : (target.index + 1) * n]
    alpha = read(m.parts["alpha"]).item() if "alpha" in m.parts else m.alpha
    return down, up, 1.0 if alpha is None else alpha / down.shape[0]


def module_delta(m: Module, read: Callable[[str], Tensor], target: Target) -> Tensor:
    """alpha/rank-scaled float32 update of one module for one target (its rows of a fused q, k, v update)."""
    def get(part: str) -> Tensor:
        t = read(m.parts[part])
        return t.flatten(1) if t.ndim > 2 else t

    rows = slice(None)
    if target.count > 1 and m.kind == "loha":
        n = m.shapes["hada_w1_a"][0] // target.count
        rows = slice(target.index * n, (target.index + 1) * n)
    alpha = read(m.parts["alpha"]).item() if "alpha" in m.parts else m.alpha
    if m.kind == "lora":
        down, up, scale = lora_factors(m, read, target)
        return (up @ down).mul_(scale)
    if m.kind == "loha":
        w1b = get("hada_w1_b")
        scale = 1.0 if alpha is None else alpha / w1b.shape[0]
        return (get("hada_w1_a")[rows] @ w1b).mul_(get("hada_w2_a")[rows] @ get("hada_w2_b")).mul_(scale)
    # LoKr: kron(w1, w2), each factor whole or a product of two; alpha/rank only applies to decomposed factors,
    # the rank taken from w2's factors when it has them (LyCORIS and ComfyUI)
    factors, rank = [], None
    for n in ("w1", "w2"):
        if f"lokr_{n}" in m.parts:
            factors.append(get(f"lokr_{n}"))
        else:
            a, b = get(f"lokr_{n}_a"), get(f"lokr_{n}_b")
            factors.append(a @ b)
            rank = b.shape[0]
    d = torch.kron(*factors)
    if alpha is not None and rank is not None:
        d.mul_(alpha / rank)
    if target.count > 1:
        n = d.shape[0] // target.count
        d = d[target.index * n : (target.index + 1) * n].clone()
    return d


def module_factors(m: Module, read: Callable[[str], Tensor], target: Target) -> tuple[Tensor, Tensor] | None:
    """(down, up), float32, with up @ down == module_delta(m, read, target) exactly in real arithmetic: a LoHa's
    (a1 @ b1) * (a2 @ b2) is a product of rank r1 * r2 (rows a1[i] * a2[j], columns b1[i] * b2[j]), a LoKr's
    kron(w1, w2_a @ w2_b) is kron(w1, w2_a) @ kron(I, w2_b). None for a LoKr whose w2 is whole (no thin form)."""
    if m.kind == "lora":
        down, up, scale = lora_factors(m, read, target)
        return down, up * scale

    def get(part: str) -> Tensor:
        t = read(m.parts[part])
        return t.flatten(1) if t.ndim > 2 else t

    alpha = read(m.parts["alpha"]).item() if "alpha" in m.parts else m.alpha
    if m.kind == "loha":
        a1, b1, a2, b2 = (get(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
        scale = 1.0 if alpha is None else alpha / b1.shape[0]
    else:
        if "lokr_w2" in m.parts:
            return None
        w1 = get("lokr_w1") if "lokr_w1" in m.parts else get("lokr_w1_a") @ get("lokr_w1_b")
        w2a, w2b = get("lokr_w2_a"), get("lokr_w2_b")
        rank = w2b.shape[0]  # as in module_delta: w2's rank when it is decomposed
        up, down = torch.kron(w1, w2a), torch.kron(torch.eye(w1.shape[1]), w2b)
        scale = 1.0 if alpha is None else alpha / rank
    if target.count > 1:
        n = up.shape[0] // target.count
        up = up[target.index * n : (target.index + 1) * n]
    return down, up * scale
