"""FlowMatch Euler sampling: the noise, the sigma schedule, and the denoising loop."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .errors import NonFiniteLatents


@dataclass(frozen=True)
class SchedulerConfig:
    """The parts of `scheduler/scheduler_config.json` that shape the schedule."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    @classmethod
    def from_dict(cls, raw: dict, path: str = "scheduler config") -> "SchedulerConfig":
        for unsupported in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                            "stochastic_sampling", "shift_terminal"):
            if raw.get(unsupported):
                raise ValueError(f"{path}: '{unsupported}' is not supported by zimage's FlowMatch Euler sampler")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and v is not None}
        cfg = cls(**known)
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"{path}: time_shift_type must be 'exponential' or 'linear', not {cfg.time_shift_type!r}")
        return cfg

    def to_json(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler",
                **{k: getattr(self, k) for k in self.__dataclass_fields__}}


def get_noise(batch: int, channels: int, height: int, width: int, seed: int, vae_scale: int = 8) -> Tensor:
    """Float32 CPU noise (batch, channels, 2*(height//16), 2*(width//16)) from `torch.Generator("cpu")` seeded
    with `seed`, so a seed gives the same image on every device."""
    gen = torch.Generator("cpu").manual_seed(seed)
    h, w = 2 * (height // (2 * vae_scale)), 2 * (width // (2 * vae_scale))
    return torch.randn((batch, channels, h, w), generator=gen, dtype=torch.float32)


def time_shift(mu: float, sigmas: Tensor, kind: str) -> Tensor:
    """Resolution-dependent shift of sigmas in (0, 1]."""
    base = math.exp(mu) if kind == "exponential" else mu
    return base / (base + (1 / sigmas - 1))


def get_sigmas(cfg: SchedulerConfig, num_steps: int, image_seq_len: int) -> Tensor:
    """The N + 1 float32 sigmas, 1.0 down to a final 0, shifted as the config asks.

    `image_seq_len` is the number of image tokens, (H/16) * (W/16); it only matters with dynamic shifting.
    """
    sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).double()
    if cfg.use_dynamic_shifting:
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = cfg.base_shift + (image_seq_len - cfg.base_image_seq_len) * slope
        sigmas = time_shift(mu, sigmas, cfg.time_shift_type)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    return torch.cat([sigmas.float(), torch.zeros(1)])


def model_times(cfg: SchedulerConfig, sigmas: Tensor) -> Tensor:
    """The model's time input for each step: 1 - sigma, rounded through the reference's timestep scale."""
    timesteps = sigmas[:-1] * cfg.num_train_timesteps
    return (cfg.num_train_timesteps - timesteps) / cfg.num_train_timesteps


def first_step(num_steps: int, strength: float) -> int:
    """Index of the first step run when starting from a picture at `strength` in (0, 1]: the reference skips the
    first int(N - min(N * strength, N)) steps of the N-step schedule."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def scale_noise(latents: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """Clean latents moved to noise level `sigma` (a float32 scalar tensor) along the flow: the reference's
    FlowMatchEulerDiscreteScheduler.scale_noise."""
    return sigma * noise + (1.0 - sigma) * latents


def inpaint_blend(latents: Tensor, image_latents: Tensor, noise: Tensor, mask: Tensor, sigma: Tensor) -> Tensor:
    """Latents after a step, with the kept region (mask 0) put back on the init image's path at noise level
    `sigma` (the next step's; 0 after the last step gives the image's latents exactly), as the reference does."""
    return (1 - mask) * scale_noise(image_latents, sigma, noise) + mask * latents


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings. Off when `scale` is 0."""

    scale: float = 0.0
    normalization: float = 0.0  # cap |guided| at this multiple of |positive|; 0 = off
    truncation: float = 1.0  # no guidance on steps whose model time exceeds this

    def scale_at(self, t: float) -> float:
        return 0.0 if self.truncation <= 1 and t > self.truncation else self.scale


def guide(pos: Tensor, neg: Tensor, scale: float, normalization: float) -> Tensor:
    """pos + scale * (pos - neg) per item, optionally renormalized to at most `normalization` * |pos|."""
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        dims = tuple(range(1, pos.ndim))
        pos_norm = torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
        new_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        limit = pos_norm * normalization
        pred = torch.where(new_norm > limit, pred * (limit / new_norm), pred)
    return pred


ModelFn = Callable[[Tensor, Tensor, list[Tensor]], Tensor]


def denoise(
    model: ModelFn,
    latents: Tensor,
    sigmas: Tensor,
    times: Tensor,
    caps: list[Tensor],
    neg_caps: list[Tensor] | None,
    guidance: Guidance,
    on_step: Callable[[int], None] | None = None,
    blend: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Run the Euler steps from sigmas[0] to sigmas[-1]; latents stay float32 on their device.

    `model(x, t, caps)` returns the transformer output; the velocity is its negative. With guidance on,
    positive and negative captions run in one batch of 2B. To start from a picture, pass the tail of the
    schedule and noised picture latents; `blend(i, latents)`, when given, rewrites the latents after step i
    (inpainting).
    """
    b = latents.shape[0]
    for i in range(len(sigmas) - 1):
        t = float(times[i])
        scale = guidance.scale_at(t) if neg_caps is not None else 0.0
        x = latents
        t_batch = times[i].expand(b).to(latents.device)
        if scale > 0:
            out = model(torch.cat([x, x]), t_batch.repeat(2), caps + neg_caps).float()
            v = -guide(out[:b], out[b:], scale, guidance.normalization)
        else:
            v = -model(x, t_batch, caps).float()
        latents = latents + (sigmas[i + 1] - sigmas[i]).item() * v
        if blend is not None:
            latents = blend(i, latents)
        if not torch.isfinite(latents).all():
            raise NonFiniteLatents(i)
        if on_step is not None:
            on_step(i)
    return latents
