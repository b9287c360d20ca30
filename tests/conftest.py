"""Shared fixtures: tiny random checkpoints in the published layout, written by the project's own code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# an empty Hugging Face cache: a model the developer has cached must not stand in for a missing folder
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="zimage-tests-hf-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from zimage.tiny import TinySpec, make_tiny  # noqa: E402

# Three shapes that between them cover: single file and shards, text encoder keys with and without the
# `model.` prefix, static and dynamic shift, several head counts and refiner depths.
SPECS = {
    "single": TinySpec(),
    "sharded": TinySpec(dim=96, n_layers=3, n_refiner_layers=2, n_heads=3, axes_dims=(8, 8, 16), te_hidden=64,
                        te_layers=4, te_heads=4, te_kv_heads=1, te_intermediate=80, shards=3, te_prefix=False,
                        dynamic_shift=True, seed=1),
    "wide": TinySpec(dim=128, n_layers=2, n_refiner_layers=2, n_heads=4, axes_dims=(8, 12, 12), te_hidden=32,
                     te_layers=2, te_heads=2, te_kv_heads=2, te_intermediate=64, vae_channels=(8, 16, 16, 16),
                     shards=2, shift=6.0, seed=2),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_tiny(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny(checkpoints) -> Path:
    """The default tiny checkpoint (single files, static shift)."""
    return checkpoints["single"]


@pytest.fixture
def fresh_tiny(tmp_path) -> Path:
    """A private copy of the default tiny checkpoint that a test may damage."""
    return make_tiny(tmp_path / "model", SPECS["single"])


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Records every attempt to load weights, which then fails: usage errors, and runs that only skip, must be
    settled before any."""
    import zimage.controlnet
    import zimage.pipeline
    import zimage.quant
    import zimage.weights

    calls: list[str] = []

    def refuse(module, folder, *args, **kwargs):
        calls.append(str(folder))
        raise AssertionError(f"weights were loaded from {folder}")

    for mod, name in ((zimage.weights, "load_weights"), (zimage.weights, "load_pieces"),
                      (zimage.pipeline, "load_pieces"), (zimage.quant, "load_pieces"),
                      (zimage.controlnet, "load_weights")):
        monkeypatch.setattr(mod, name, refuse)
    return calls


@pytest.fixture
def accelerator() -> torch.device:
    """The GPU of a `cuda`-marked test (scripts/gpu_check.sh runs them): CUDA, else MPS; skipped on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    pytest.skip("no CUDA or MPS device")
