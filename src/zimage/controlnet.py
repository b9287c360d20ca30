"""Z-Image ControlNet (VideoX-Fun's Z-Image-Turbo-Fun-ControlNet-Union 1.0 / 2.0 / 2.1 and Tile, diffusers'
`ZImageControlNetModel`): control blocks that turn a condition image's latents into residuals added after some
of the transformer's main layers.

Parameter names equal the checkpoint keys. The ControlNet owns only its control blocks and its condition embedder;
the timestep and caption embedders, the pad tokens and the refiners are the transformer's, used as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .transformer import (Linear, TransformerBlock, TransformerConfig, ZImageTransformer, batch_mask, pad_with_token,
                          patchify)
from .weights import (WeightsError, checkpoint_header, expected_shapes, load_weights, match_keys, read_config,
                      read_header)

STEM = "diffusion_pytorch_model"  # diffusers' save_pretrained name
VARIANTS = (None, "control_layers", "control_noise_refiner")  # 1.0, 2.0 and 2.1 checkpoints


@dataclass(frozen=True)
class ControlNetConfig:
    """Hyper-parameters, as stored in a ControlNet's `config.json`."""

    control_layers_places: tuple[int, ...] = (0,)  # main layers that get a residual, one control block each
    control_refiner_layers_places: tuple[int, ...] = ()
    control_in_dim: int = 16  # 16: the condition's latents; 33: plus a keep-mask and masked-image latents (2.x)
    add_control_noise_refiner: str | None = None
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    @classmethod
    def from_json(cls, path: str | Path) -> "ControlNetConfig":
        raw = json.loads(Path(path).read_text())
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in cls.__dataclass_fields__}
        cfg = cls(**known)
        if cfg.add_control_noise_refiner not in VARIANTS or 0 not in cfg.control_layers_places:
            raise ValueError("not a Z-Image ControlNet config (add_control_noise_refiner must be null, "
                             "'control_layers' or 'control_noise_refiner'; control_layers_places must hold 0)")
        return cfg

    @classmethod
    def from_single_file(cls, path: Path, tcfg: TransformerConfig) -> "ControlNetConfig":
        """The config of a single-file checkpoint, read from its tensor names and shapes as diffusers' single-file
        loader tells the published versions apart; control blocks are spread evenly over the main layers."""
        header = read_header(path)
        key = f"control_all_x_embedder.{tcfg.patch_key}.weight"
        if key not in header:
            raise WeightsError(f"{path} is not a Z-Image ControlNet (it has no '{key}')")
        n = len({k.split(".")[1] for k in header if k.startswith("control_layers.")})
        variant = None
        if "control_layers.14.adaLN_modulation.0.weight" in header:  # 2.x; 2.1 has a trained control refiner
            variant = "control_layers"
            proj = "control_noise_refiner.0.before_proj.weight"
            if proj in header:
                with safe_open(str(path), framework="pt") as f:
                    if bool(f.get_tensor(proj).any()):
                        variant = "control_noise_refiner"
        dim, width = header[key].shape
        return cls(control_layers_places=tuple(range(0, tcfg.n_layers, max(tcfg.n_layers // max(n, 1), 1)))[:n],
                   control_refiner_layers_places=tuple(range(tcfg.n_refiner_layers)) if variant else (),
                   control_in_dim=width // (tcfg.patch_size**2 * tcfg.f_patch_size), add_control_noise_refiner=variant,
                   all_patch_size=tcfg.all_patch_size, all_f_patch_size=tcfg.all_f_patch_size, dim=dim,
                   n_refiner_layers=tcfg.n_refiner_layers, n_heads=tcfg.n_heads, n_kv_heads=tcfg.n_kv_heads,
                   norm_eps=tcfg.norm_eps, qk_norm=tcfg.qk_norm)


class ControlBlock(TransformerBlock):
    """A modulated transformer block on the control stream. The first one adds the projected condition to the
    hidden states it follows; each one emits a residual through `after_proj`."""

    def __init__(self, cfg: TransformerConfig, first: bool):
        super().__init__(cfg, modulation=True)
        if first:
            self.before_proj = Linear(cfg.dim, cfg.dim)
        self.after_proj = Linear(cfg.dim, cfg.dim)

    def forward(self, c: Tensor, x: Tensor, rope: Tensor, mask: Tensor | None, t_emb: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self, "before_proj"):
            c = self.before_proj(c) + x
        c = super().forward(c, rope, mask, t_emb)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    """`forward` gives the residuals {main layer index: tensor} that `ZImageTransformer.forward` adds."""

    def __init__(self, cfg: ControlNetConfig, tcfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        bcfg = replace(tcfg, norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm)
        self.control_layers = nn.ModuleList([ControlBlock(bcfg, place == 0) for place in cfg.control_layers_places])
        p, fp = tcfg.patch_size, tcfg.f_patch_size
        self.control_all_x_embedder = nn.ModuleDict({tcfg.patch_key: Linear(fp * p * p * cfg.control_in_dim, cfg.dim)})
        if cfg.add_control_noise_refiner is None:
            self.control_noise_refiner = nn.ModuleList([TransformerBlock(bcfg, True)
                                                        for _ in range(cfg.n_refiner_layers)])
        elif cfg.add_control_noise_refiner == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList([ControlBlock(bcfg, i == 0)
                                                        for i in range(cfg.n_refiner_layers)])

    @property
    def blocks(self) -> list[nn.Module]:
        return [*getattr(self, "control_noise_refiner", []), *self.control_layers]

    def forward(self, tr: ZImageTransformer, x: Tensor, t: Tensor, cap_feats: list[Tensor], control: Tensor,
                scale: float) -> dict[int, Tensor]:
        """Residuals for latents x (B, C, H, W) at model time t (B,), with condition latents `control`
        (B, control_in_dim, H, W); the same inputs as the transformer's, computed as diffusers does."""
        tcfg, p, dtype = tr.cfg, tr.cfg.patch_size, tr.dtype
        gh, gw = x.shape[2] // p, x.shape[3] // p
        t_emb = tr.t_embedder(t * tcfg.t_scale).to(dtype)
        img = tr.all_x_embedder[tcfg.patch_key](patchify(x.to(dtype), p))
        img = torch.stack([pad_with_token(i, tr.x_pad_token) for i in img])
        c = self.control_all_x_embedder[tcfg.patch_key](patchify(control.to(dtype), p))
        c = torch.stack([pad_with_token(i, tr.x_pad_token) for i in c])
        cap, cap_lens = tr.embed_captions(cap_feats)
        img_rope, cap_rope, rope = tr.rope_for(cap_lens, cap.shape[1], gh, gw, x.device)

        refiner_hints: dict[int, Tensor] = {}
        variant = self.cfg.add_control_noise_refiner
        if variant is not None:  # 2.x: the control stream first runs on the image tokens, steering the refiner
            hints = []
            for block in self.control_layers if variant == "control_layers" else self.control_noise_refiner:
                c, hint = block(c, img, img_rope, None, t_emb)
                hints.append(hint)
            refiner_hints = {place: hints[k] * scale for k, place in enumerate(self.cfg.control_refiner_layers_places)}
        for i, block in enumerate(tr.noise_refiner):
            img = block(img, img_rope, None, t_emb)
            if i in refiner_hints:
                img = img + refiner_hints[i]
        cap_mask = batch_mask(cap_lens, cap.shape[1], x.device)
        for block in tr.context_refiner:
            cap = block(cap, cap_rope, cap_mask)
        if variant is None:
            for block in self.control_noise_refiner:
                c = block(c, img_rope, None, t_emb)

        n_img = img.shape[1]
        seq, c = torch.cat([img, cap], dim=1), torch.cat([c, cap], dim=1)
        mask = batch_mask([n_img + n for n in cap_lens], seq.shape[1], x.device)
        out = {}
        for place, block in zip(self.cfg.control_layers_places, self.control_layers):
            c, hint = block(c, seq, rope, mask, t_emb)
            out[place] = hint * scale
        return out


class Controlled:
    """The transformer steered by a ControlNet: called like the transformer by the denoising loop."""

    def __init__(self, transformer: ZImageTransformer, controlnet: ZImageControlNet, context: Tensor, scale: float):
        self.transformer, self.controlnet, self.context, self.scale = transformer, controlnet, context, scale

    def __call__(self, x: Tensor, t: Tensor, caps: list[Tensor]) -> Tensor:
        context = self.context.repeat(x.shape[0] // self.context.shape[0], 1, 1, 1)  # [pos, neg] halves under CFG
        residuals = self.controlnet(self.transformer, x, t, caps, context, self.scale)
        return self.transformer(x, t, caps, control=residuals)


def locate(path: Path, tcfg: TransformerConfig) -> tuple[Path, str, ControlNetConfig]:
    """(folder, file stem, config) of a ControlNet given as a diffusers folder or as one .safetensors file."""
    if path.is_dir():
        return path, STEM, read_config(ControlNetConfig.from_json, path / "config.json")
    if not path.is_file():
        raise WeightsError(f"--controlnet {path} not found")
    if path.suffix != ".safetensors":
        raise WeightsError(f"--controlnet {path}: expected a folder or a .safetensors file")
    return path.parent, path.name.removesuffix(".safetensors"), ControlNetConfig.from_single_file(path, tcfg)


def skip_unused(cfg: ControlNetConfig):
    """Checkpoint key -> module key: 2.0 single files carry an untrained control refiner that is never run."""
    if cfg.add_control_noise_refiner == "control_layers":
        return lambda k: None if k.startswith("control_noise_refiner.") else k
    return lambda k: k


def controlnet_problem(path: Path, tcfg: TransformerConfig, inpaint: bool) -> str | None:
    """Why this ControlNet cannot steer this transformer, read from config and headers only; None when it can."""
    try:
        folder, stem, cfg = locate(path, tcfg)
        if cfg.dim != tcfg.dim or cfg.n_heads != tcfg.n_heads or max(cfg.control_layers_places) >= tcfg.n_layers:
            return (f"--controlnet {path} is for another model (dim {cfg.dim}, {cfg.n_heads} heads, layers up to "
                    f"{max(cfg.control_layers_places)}; the transformer has dim {tcfg.dim}, {tcfg.n_heads} heads, "
                    f"{tcfg.n_layers} layers)")
        if cfg.control_in_dim not in (tcfg.in_channels, 2 * tcfg.in_channels + 1):
            return f"--controlnet {path} takes {cfg.control_in_dim} input channels; Z-Image ControlNets take 16 or 33"
        if inpaint and cfg.control_in_dim == tcfg.in_channels:
            return (f"--controlnet {path} is a 1.0 ControlNet (16 input channels); inpainting with a ControlNet "
                    "needs a 2.x one (33)")
        with torch.device("meta"):
            model = ZImageControlNet(cfg, tcfg)
        match_keys(checkpoint_header(folder, stem), expected_shapes(model), skip_unused(cfg), folder)
    except WeightsError as e:
        return f"--controlnet: {e}" if not str(e).startswith("--controlnet") else str(e)
    return None


def load_controlnet(path: Path, tcfg: TransformerConfig, device: torch.device, dtype: torch.dtype) -> ZImageControlNet:
    folder, stem, cfg = locate(path, tcfg)
    with torch.device("meta"):
        model = ZImageControlNet(cfg, tcfg)
    return load_weights(model, folder, stem, dtype, device, skip_unused(cfg))
