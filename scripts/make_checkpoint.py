#!/usr/bin/env python3
"""Write a random Z-Image checkpoint in the published layout, for benchmarks without the real weights.

    .venv/bin/python scripts/make_checkpoint.py CONFIG [--out DIR] [--seed N]

CONFIG is one of
  tiny  zimage.tiny.make_tiny's default spec (what the tests use).
  mid   a mid-sized model: transformer dim 1536, 8 + 2 + 2 blocks, 12 heads of 128; text encoder hidden 1024,
        8 layers, 16 heads / 8 kv heads of 64, intermediate 3072; the full Flux VAE. About 1.9 GB on disk.
  full  the published shapes: 6.15B-parameter float32 transformer in 3 shards (24.6 GB), the Qwen3-4B text
        encoder (36 layers, vocab 151936) in bfloat16 in 3 shards (8 GB), the Flux VAE. About 33 GB on disk.

`tiny` and `mid` go through zimage.tiny.make_tiny. `full` cannot (it would hold the 24.6 GB transformer in RAM),
so it is streamed: every tensor's name and shape come from the model built on the meta device, and each tensor
is drawn and appended to its safetensors shard on its own, so peak memory is one tensor (under 2 GB).

Random weights follow zimage.tiny.randomize (weights scaled by 1/sqrt(fan_in), norms near 1, small biases), so
a forward pass stays finite; `full` draws uniform numbers of the same standard deviation, which is much cheaper
than normal ones. The tokenizer is always the tiny byte-level BPE; its ids are small and fit any vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from zimage.tiny import TinySpec, make_tiny, randomize, write_model_index, write_tokenizer  # noqa: E402
from zimage.transformer import TransformerConfig, ZImageTransformer  # noqa: E402
from zimage.vae import AutoencoderKL, VAEConfig  # noqa: E402
from zimage.weights import WEIGHT_STEMS, save_weights  # noqa: E402

CONFIGS = ("tiny", "mid", "full")

MID = TinySpec(dim=1536, n_layers=8, n_refiner_layers=2, n_heads=12, axes_dims=(32, 48, 48),
               te_hidden=1024, te_layers=8, te_heads=16, te_kv_heads=8, te_intermediate=3072,
               vae_channels=(128, 256, 512, 512), vae_groups=32, shards=3)

FULL_TRANSFORMER = TransformerConfig()  # the defaults are the published config
FULL_TE = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128)
FULL_SHARDS = 3

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One random tensor with zimage.tiny.randomize's scales, from uniform numbers of the same std."""
    if len(shape) >= 2 and "pad_token" not in name:
        std, mean = 1 / math.sqrt(math.prod(shape[1:])), 0.0
    elif "norm" in name and name.endswith("weight"):
        std, mean = 0.1, 1.0
    elif "pad_token" in name:
        std, mean = 0.5, 0.0
    else:
        std, mean = 0.02, 0.0
    half = std * math.sqrt(3)
    t = torch.empty(shape, dtype=torch.float32).uniform_(mean - half, mean + half, generator=gen)
    return t if dtype == torch.float32 else t.to(dtype)


def write_streamed(shapes: dict[str, tuple[int, ...]], folder: Path, stem: str, dtype: torch.dtype, shards: int,
                   gen: torch.Generator) -> None:
    """Write random tensors of the given shapes as `shards` safetensors files plus an index, one tensor at a
    time: the header is computed from the shapes first, then each tensor is drawn, written and dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = {k: math.prod(s) * size for k, s in shapes.items()}
    total = sum(nbytes.values())
    # split into shards of about equal bytes, keeping state_dict order
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for k in shapes:
        groups[min(shards - 1, int(done * shards / total))].append(k)
        done += nbytes[k]
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else f"{stem}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for k in names:
            header[k] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + nbytes[k]]}
            offset += nbytes[k]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        t0 = time.perf_counter()
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k in names:
                t = draw(k, shapes[k], dtype, gen)
                t = t.contiguous()
                f.write((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy().data)
                del t
        print(f"  {folder.name}/{fname}: {len(names)} tensors, {offset / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        weight_map.update({k: fname for k in names})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def make_full(out: Path, seed: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    write_model_index(out / "model_index.json")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(TinySpec().scheduler_config().to_json(),
                                                                        indent=2))
    write_tokenizer(out / "tokenizer", TinySpec().vocab_merges)

    # text encoder: Qwen3-4B shapes, keys under `model.` (Qwen3ForCausalLM) with the tied lm_head left out
    cfg = Qwen3Config(**FULL_TE, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.dtype = "bfloat16"  # as published
    with torch.device("meta"):
        te = Qwen3ForCausalLM(cfg)
    shapes = {k: s for k, s in meta_shapes(te).items() if not k.startswith("lm_head.")}
    del te
    (out / "text_encoder").mkdir()
    cfg.save_pretrained(str(out / "text_encoder"))
    write_streamed(shapes, out / "text_encoder", WEIGHT_STEMS["text_encoder"], torch.bfloat16, FULL_SHARDS, gen)

    # transformer: the published float32 DiT
    tcfg = FULL_TRANSFORMER
    with torch.device("meta"):
        shapes = meta_shapes(ZImageTransformer(tcfg))
    (out / "transformer").mkdir()
    (out / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "ZImageTransformer2DModel", **tcfg.to_json()}, indent=2))
    write_streamed(shapes, out / "transformer", WEIGHT_STEMS["transformer"], torch.float32, FULL_SHARDS, gen)

    # VAE: 84M parameters, small enough to build whole
    vcfg = VAEConfig()
    vae = AutoencoderKL(vcfg)
    randomize(vae, gen)
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **vcfg.to_json()}, indent=2))
    save_weights(vae.state_dict(), out / "vae", WEIGHT_STEMS["vae"], 1)
    return out


def make_checkpoint(config: str, out: Path, seed: int = 0) -> Path:
    if config == "tiny":
        return make_tiny(out, TinySpec(seed=seed))
    if config == "mid":
        return make_tiny(out, MID.__class__(**{**MID.__dict__, "seed": seed}))
    if config == "full":
        return make_full(out, seed)
    raise ValueError(f"unknown config {config!r}; one of {', '.join(CONFIGS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", choices=CONFIGS)
    ap.add_argument("--out", type=Path, help="folder to write (replaced); default bench-cache/CONFIG")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out or ROOT / "bench-cache" / args.config
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    make_checkpoint(args.config, out, args.seed)
    print(f"wrote {args.config} checkpoint to {out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
