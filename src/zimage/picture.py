"""Starting from pictures: the latents the reference makes from an init image, a mask and a control image.

Random draws follow the reference with one generator per image seeded with its seed (diffusers given a list of
generators): image-to-image draws the VAE posterior sample first, then the noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import ROLES, image_array, load_rgb, mask_array
from .scheduler import inpaint_blend, scale_noise
from .vae import AutoencoderKL


def picture(path: str, role: str, width: int, height: int) -> Tensor:
    """(1, 3, height, width) float32 in [-1, 1] from a picture file, resized as the reference does."""
    return torch.from_numpy(image_array(load_rgb(Path(path), ROLES[role]), width, height))


def mask(path: str, width: int, height: int) -> Tensor:
    """(1, 1, height, width) binary mask, 1 = repaint."""
    return torch.from_numpy(mask_array(load_rgb(Path(path), ROLES["mask"]), width, height))


def latent_shape(vae: AutoencoderKL, channels: int, width: int, height: int) -> tuple[int, int, int, int]:
    s = vae.cfg.scale_factor
    return 1, channels, 2 * (height // (2 * s)), 2 * (width // (2 * s))


def start_latents(vae: AutoencoderKL, init_image: str, seed: int, width: int, height: int, sigma: Tensor,
                  channels: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(noised latents, noise, clean image latents), each (1, C, h, w) float32 on `device`: the init image encoded
    with a sample of the VAE posterior and moved to noise level `sigma` (the first step that runs)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = latent_shape(vae, channels, width, height)
    sample = torch.randn(shape, generator=gen, dtype=torch.float32)
    image = vae.encode(picture(init_image, "init_image", width, height).to(device), sample)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    return scale_noise(image, sigma.to(device), noise), noise, image


def latent_mask(path: str, width: int, height: int, size: tuple[int, int], device: torch.device) -> Tensor:
    """The binary mask at latent resolution (nearest neighbour, as the reference), (1, 1, h, w)."""
    return F.interpolate(mask(path, width, height), size=size, mode="nearest").to(device)


def blender(image: Tensor, noise: Tensor, masks: Tensor, sigmas: Tensor):
    """`blend(i, latents)` for the denoising loop: after step i, the kept region goes back on the init image's
    path at the next sigma (`sigmas` is the run's part of the schedule, final 0 included)."""
    sigmas = sigmas.to(image.device)
    return lambda i, latents: inpaint_blend(latents, image, noise, masks, sigmas[i + 1])


def control_latents(vae: AutoencoderKL, control_image: str, width: int, height: int, in_dim: int,
                    device: torch.device, init_image: str | None = None, mask_path: str | None = None) -> Tensor:
    """The ControlNet's condition (1, in_dim, h, w): the control image's posterior mean; for a 33-channel (2.x)
    ControlNet followed by the keep-mask and the masked init image's latents (ControlNet inpainting), or zeros."""
    control = vae.encode(picture(control_image, "control_image", width, height).to(device))
    if mask_path is None:
        extra = in_dim - control.shape[1]
        return torch.cat([control, control.new_zeros(1, extra, *control.shape[2:])], 1) if extra else control
    m = mask(mask_path, width, height).to(device)
    masked = vae.encode(picture(init_image, "init_image", width, height).to(device) * (m < 0.5))
    keep = F.interpolate(1 - m, size=masked.shape[-2:], mode="nearest")
    return torch.cat([control, keep, masked], dim=1)
