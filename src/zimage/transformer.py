"""The Z-Image single-stream diffusion transformer (S3-DiT).

Module and parameter names equal the keys of the published `transformer/` checkpoint (diffusers'
`ZImageTransformer2DModel`), so weights load with a plain `load_state_dict`.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import Rope, RopeTables, apply_rope

SEQ_MULTIPLE = 32  # every token group is padded to a multiple of this with a learned pad token
ADALN_DIM = 256  # width of the timestep embedding that drives adaLN (capped at dim)
T_EMBED_HIDDEN = 1024  # hidden width of the timestep MLP in the published architecture
T_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP


# torch sends float32 CPU matmuls to MKL, which skips its AVX-512 code on AMD CPUs; oneDNN's kernel does not
ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products run in oneDNN (2.1x the throughput of MKL on a Zen 5 CPU; same result
    up to summation order). Other devices and dtypes, torch.compile, and autograd (the kernel has no backward)
    take the usual path."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, through oneDNN for float32 on the CPU (see Linear); quantized linears share it."""
    if (ONEDNN_LINEAR and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture hyper-parameters, as stored in `transformer/config.json`."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    in_channels: int = 16
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "TransformerConfig":
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for key in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def __post_init__(self):
        if self.dim % self.n_heads or self.dim // self.n_heads != sum(self.axes_dims):
            raise ValueError(f"head_dim = dim {self.dim} / n_heads {self.n_heads} must be a whole number equal to "
                             f"sum(axes_dims) {sum(self.axes_dims)}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3 or any(d % 2 for d in self.axes_dims):
            raise ValueError("axes_dims and axes_lens must have 3 entries, axes_dims even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def f_patch_size(self) -> int:
        return self.all_f_patch_size[0]

    @property
    def patch_key(self) -> str:
        return f"{self.patch_size}-{self.f_patch_size}"

    @property
    def max_image_side(self) -> int:
        """Largest latent side (in latent pixels) the RoPE tables cover."""
        return min(self.axes_lens[1], self.axes_lens[2]) * self.patch_size


class RMSNorm(nn.Module):
    """RMSNorm with the reference's rounding: statistics in float32, result in the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the mean square as a float32 norm: one pass and no float32 copy of x (half the time of pow + mean)
        variance = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[-1])
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, eps: float, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(dim, dim, bias=False)
        self.to_v = Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if x.device.type == "cpu":  # the CPU's SDPA runs 12% faster on (B, H, L, D)-contiguous inputs
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre/post-normed attention + SwiGLU block; with `modulation`, scaled and gated by the timestep (adaLN)."""

    def __init__(self, cfg: TransformerConfig, modulation: bool):
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads, 1e-5, cfg.qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(Linear(min(dim, ADALN_DIM), 4 * dim, bias=True))

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, t_emb: Tensor | None = None) -> Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), rope, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(T_FREQ_DIM, T_EMBED_HIDDEN), nn.SiLU(), Linear(T_EMBED_HIDDEN, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        half = T_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].bias.dtype))  # the bias: a quantized weight is stored as int8/bytes


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(min(dim, ADALN_DIM), dim, bias=True))

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        scale = 1.0 + self.adaLN_modulation(t_emb).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)


def padded_len(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def pad_with_token(x: Tensor, token: Tensor) -> Tensor:
    """Append rows of the learned pad token to (N, dim) until N is a multiple of SEQ_MULTIPLE."""
    extra = padded_len(len(x)) - len(x)
    return torch.cat([x, token.to(x.dtype).expand(extra, -1)]) if extra else x


def image_position_ids(cap_len: int, h: int, w: int, device: torch.device) -> Tensor:
    """(padded h*w, 3) ids: (cap_len + 1, row, col) for real patches, (0, 0, 0) for pad rows."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(rows, cap_len + 1), rows, cols], dim=-1).flatten(0, 1)
    extra = padded_len(h * w) - h * w
    return torch.cat([ids, ids.new_zeros(extra, 3)])


def caption_position_ids(cap_len: int, device: torch.device) -> Tensor:
    """(cap_len, 3) ids (1 + k, 0, 0); pad rows included, as the reference does."""
    k = torch.arange(1, cap_len + 1, device=device)
    return torch.stack([k, torch.zeros_like(k), torch.zeros_like(k)], dim=-1)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): row-major patches, channels fastest inside a patch."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """Inverse of `patchify` for (B, h*w, p*p*c) tokens of an (h, w) patch grid."""
    b = x.shape[0]
    x = x.view(b, h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def batch_mask(lengths: list[int], total: int, device: torch.device) -> Tensor | None:
    """SDPA boolean mask (B, 1, 1, total) hiding batch padding; None when no item is padded."""
    if all(n == total for n in lengths):
        return None
    idx = torch.arange(total, device=device)
    return (idx[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]


class ZImageTransformer(nn.Module):
    """The Z-Image DiT. `forward` predicts the flow for a batch of same-sized latents."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        p, fp, c = cfg.patch_size, cfg.f_patch_size, cfg.in_channels
        self.all_x_embedder = nn.ModuleDict({cfg.patch_key: Linear(fp * p * p * c, cfg.dim, bias=True)})
        self.all_final_layer = nn.ModuleDict({cfg.patch_key: FinalLayer(cfg.dim, p * p * fp * c)})
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(cfg.dim, ADALN_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_layers)])
        self.rope = RopeTables(cfg.rope_theta, cfg.axes_dims, cfg.axes_lens)
        self._rope_cache: dict[tuple, tuple] = {}

    def rope_for(self, cap_lens: list[int], cap_total: int, gh: int, gw: int, device: torch.device) -> tuple:
        """RoPE rotations for the image tokens, the caption tokens and the joint sequence; cached per size, since
        every step of a run asks for the same."""
        key = (tuple(cap_lens), cap_total, gh, gw, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            img = self.rope(torch.stack([image_position_ids(n, gh, gw, device) for n in cap_lens])[:, None])
            cap = self.rope(caption_position_ids(cap_total, device)[None, None])
            joint = img.cat(cap.expand(len(img.cos), -1, -1, -1), dim=2)
            self._rope_cache[key] = (img, cap, joint)
        return self._rope_cache[key]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    def embed_captions(self, cap_feats: list[Tensor]) -> tuple[Tensor, list[int]]:
        """Embed and pad each caption to a multiple of 32, then stack into (B, max_len, dim)."""
        caps = [pad_with_token(self.cap_embedder(c.to(self.dtype)), self.cap_pad_token) for c in cap_feats]
        lengths = [len(c) for c in caps]
        return nn.utils.rnn.pad_sequence(caps, batch_first=True), lengths

    def forward(self, x: Tensor, t: Tensor, cap_feats: list[Tensor], control: dict[int, Tensor] | None = None) -> Tensor:
        """x (B, C, H, W) latents, t (B,) model time in [0, 1] (1 = clean), one (L_i, cap_feat_dim) caption per item;
        `control`: ControlNet residuals added to the joint sequence after the main layers they are keyed by.

        Returns the model output (B, C, H, W) in the model's dtype; the flow velocity is its negative.
        """
        cfg, p = self.cfg, self.cfg.patch_size
        b, c, h, w = x.shape
        gh, gw = h // p, w // p
        t_emb = self.t_embedder(t * cfg.t_scale).to(self.dtype)

        img = self.all_x_embedder[cfg.patch_key](patchify(x.to(self.dtype), p))
        img = torch.stack([pad_with_token(i, self.x_pad_token) for i in img])
        cap, cap_lens = self.embed_captions(cap_feats)
        img_rope, cap_rope, rope = self.rope_for(cap_lens, cap.shape[1], gh, gw, x.device)

        for block in self.noise_refiner:
            img = block(img, img_rope, None, t_emb)
        cap_mask = batch_mask(cap_lens, cap.shape[1], x.device)
        for block in self.context_refiner:
            cap = block(cap, cap_rope, cap_mask)

        n_img = img.shape[1]
        seq = torch.cat([img, cap], dim=1)
        mask = batch_mask([n_img + n for n in cap_lens], seq.shape[1], x.device)
        for i, block in enumerate(self.layers):
            seq = block(seq, rope, mask, t_emb)
            if control is not None and i in control:
                seq = seq + control[i]

        out = self.all_final_layer[cfg.patch_key](seq[:, : gh * gw], t_emb)
        return unpatchify(out, gh, gw, p, c)
