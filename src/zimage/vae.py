"""The Flux AutoencoderKL, with diffusers' parameter names so `vae/` checkpoints load as they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import GroupNorm, decode_tiles

GROUP_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Autoencoder hyper-parameters, as stored in `vae/config.json`."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    force_upcast: bool = True

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "VAEConfig":
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        known["shift_factor"] = known.get("shift_factor") or 0.0
        return cls(**known)

    def to_json(self) -> dict:
        n = len(self.block_out_channels)
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["block_out_channels"] = list(self.block_out_channels)
        d["act_fn"] = "silu"
        d["down_block_types"] = ["DownEncoderBlock2D"] * n
        d["up_block_types"] = ["UpDecoderBlock2D"] * n
        return d

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along a side."""
        return 2 ** (len(self.block_out_channels) - 1)


def group_norm(cfg: VAEConfig, channels: int) -> GroupNorm:
    return GroupNorm(cfg.norm_num_groups, channels, GROUP_NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        # in place where the input is a fresh temporary: full-resolution maps are hundreds of MB each
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.group_norm = group_norm(cfg, c)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.group_norm(x).flatten(2).transpose(1, 2)[:, None]
        out = F.scaled_dot_product_attention(self.to_q(s), self.to_k(s), self.to_v(s))
        out = self.to_out[0](out[:, 0]).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, c, c), ResnetBlock(cfg, c, c)])
        self.attentions = nn.ModuleList([AttnBlock(cfg, c)] if cfg.mid_block_add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cfg, c_in if i == 0 else c_out, c_out) for i in range(cfg.layers_per_block)]
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cfg, c_in if i == 0 else c_out, c_out) for i in range(cfg.layers_per_block + 1)]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1) for i in range(len(ch))]
        )
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, ch[0])
        self.up_blocks = nn.ModuleList(
            [UpBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1) for i in range(len(ch))]
        )
        self.conv_norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.upsample(self.mid_block(self.conv_in(z)))

    def upsample(self, x: Tensor) -> Tensor:
        """The part after the mid block: local convolutions and upsampling to pixels."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class AutoencoderKL(nn.Module):
    """Flux's VAE. `decode` maps sampler latents to images in [-1, 1]; `encode` does the reverse (posterior mean)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def _memory_format(self) -> torch.memory_format:
        w = self.decoder.conv_in.weight
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def decode_raw(self, z: Tensor) -> Tensor:
        """Decode autoencoder-space latents z (B, C, h, w) to images (B, 3, 8h, 8w) in about [-1, 1]."""
        z = z.to(self.dtype, memory_format=self._memory_format)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: Tensor, tile: int | None = None, overlap: int = 16) -> Tensor:
        """Decode sampler latents (scaled and shifted per the config) to float32 images in about [-1, 1].

        With `tile` (in latent pixels), the upsampling stages run on overlapping tiles blended linearly, so
        memory follows the tile size instead of the image size.
        """
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        if tile is None or (z.shape[-2] <= tile and z.shape[-1] <= tile):
            return self.decode_raw(z).float()
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: Tensor, tile: int, overlap: int) -> Tensor:
        # The mid block (with its global attention) runs whole: at latent resolution it is small. Only the
        # upsampling stages, where the memory goes, run per tile. Their group norms must see the whole image's
        # statistics, or each tile gets its own tone: passes over the tiles measure them (each tile contributing
        # the region it owns), refined tiling.STAT_PASSES times before the pass that is kept.
        z = z.to(self.dtype, memory_format=self._memory_format)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.decoder.mid_block(self.decoder.conv_in(z))
        norms = [m for block in (*self.decoder.up_blocks, self.decoder.conv_norm_out) for m in block.modules()
                 if isinstance(m, GroupNorm)]
        return decode_tiles(self.decoder.upsample, h, norms, tile, overlap, self.cfg.scale_factor,
                            self.cfg.out_channels)

    def encode(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Encode images in [-1, 1] to sampler latents (scaled and shifted per the config): the posterior mean, or
        with `noise` (standard normal, the latents' shape) a sample of the posterior, mean + std * noise."""
        moments = self.encoder(images.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.float().chunk(2, dim=1)
        if noise is not None:  # the reference's DiagonalGaussianDistribution.sample
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return (mean - self.cfg.shift_factor) * self.cfg.scaling_factor
