"""1X GENIE: the spatio-temporal masked video transformer of the 1X world-model challenge, state-dict compatible
with the released ``1x-technologies/GENIE_35M`` / ``GENIE_138M`` files (``config.json`` + ``model.safetensors``).

Re-implemented from the facts in the project's GENIE notes (no code imported from the original, which needs
xformers and mup). Attention is ``F.scaled_dot_product_attention`` with the original's scale (hd^-0.5, or
8/hd with muP) and causal temporal attention (a frame sees itself and earlier frames). Tokens are
factorised: token x = sum_i f_i V^i with F digits f_i < V, embedded as sum_i E_i[f_i]; the mask token
(id = image_vocab_size) has its own embedding. The FFN of each block is timm's ``Mlp``, so upcycling finds it.

Registered with timm: ``genie`` (any config as keywords), ``genie_35m``, ``genie_138m``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from moe_cli.models.registry import build
from moe_cli.runtime import memory_bytes


@dataclass
class GenieConfig:
    """The flat fields of the released ``config.json`` (GenieConfig); ``factored_vocab_size`` is derived."""

    num_layers: int
    num_heads: int
    d_model: int
    T: int = 16
    S: int = 256
    image_vocab_size: int = 262144
    use_mup: bool = False
    num_factored_vocabs: int = 1
    qkv_bias: bool = False
    proj_bias: bool = True
    attn_drop: float = 0.0
    qk_norm: bool = True
    mlp_ratio: float = 4.0
    mlp_drop: float = 0.0
    mlp_bias: bool = True
    max_corrupt_rate: float = 0.2
    non_mlm_ratio: float = 0.5
    num_prompt_frames: int = 8

    def __post_init__(self):
        for f in fields(self):
            value, kind = getattr(self, f.name), {"int": int, "float": float, "bool": bool}[str(f.type)]
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"GENIE config `{f.name}` must be {'true/false' if kind is bool else kind.__name__}, "
                                 f"got {value!r}")
        for name in ("num_layers", "num_heads", "d_model", "T", "S", "image_vocab_size", "num_factored_vocabs"):
            if getattr(self, name) < 1:
                raise ValueError(f"GENIE config `{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("attn_drop", "mlp_drop", "max_corrupt_rate", "non_mlm_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"GENIE config `{name}` must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.mlp_ratio <= 64 or self.num_prompt_frames < 0:
            raise ValueError(f"GENIE config: mlp_ratio must be in (0, 64] and num_prompt_frames >= 0, got "
                             f"{self.mlp_ratio} and {self.num_prompt_frames}")
        self.factored_vocab_size = factored_vocab(self.image_vocab_size, self.num_factored_vocabs)
        side = math.isqrt(self.S)
        if side * side != self.S:
            raise ValueError(f"S (tokens per frame) must be a square, got {self.S}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        need, have = 4 * self.parameters(), memory_bytes()
        if have is not None and need > 0.8 * have:
            raise ValueError(f"this GENIE config has about {self.parameters() / 1e9:.1f}B parameters "
                             f"({need / 1e9:.0f} GB in fp32), more than this machine's memory ({have / 1e9:.0f} GB)")

    def parameters(self) -> int:
        """About how many parameters the model has (blocks, embeddings, readout), before building it."""
        d, hidden = self.d_model, int(self.d_model * self.mlp_ratio)
        block = 2 * (4 * d * d) + 2 * d * hidden
        return self.num_layers * block + 2 * self.num_factored_vocabs * self.factored_vocab_size * d + \
            self.T * self.S * d
    @classmethod
    def from_dict(cls, d: dict) -> GenieConfig:
        """From a released config.json: the known fields (factored_vocab_size is recomputed, others ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


GENIE_KEYS = {"num_layers", "num_heads", "d_model", "image_vocab_size", "num_factored_vocabs"}


def is_genie_config(d) -> bool:
    return isinstance(d, dict) and GENIE_KEYS <= set(d) and "architecture" not in d


def factored_vocab(vocab: int, factors: int) -> int:
    """The exact ``factors``-th root of ``vocab`` (each token is ``factors`` digits in base V)."""
    v = round(vocab ** (1 / factors))
    for cand in (v - 1, v, v + 1):
        if cand > 0 and cand ** factors == vocab:
            return cand
    raise ValueError(f"image_vocab_size {vocab} is not a perfect {factors}-th power")


class GenieAttention(nn.Module):
    """Multi-head self-attention with optional q/k LayerNorm (over the head dim) and the muP scale 8/hd."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool, use_mup: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = 8 / self.head_dim if use_mup else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.norm = nn.LayerNorm(self.head_dim) if qk_norm else None

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.norm is not None:
            q, k = self.norm(q), self.norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class STBlock(nn.Module):
    """x += spatial(norm1(x)) per frame; x += temporal(x) per position, causal, no pre-norm; x += mlp(norm2(x)).
    With qk_norm both pre-norms are identities (no keys)."""

    def __init__(self, cfg: GenieConfig):
        super().__init__()
        c = cfg.d_model
        self.norm1 = nn.Identity() if cfg.qk_norm else nn.LayerNorm(c)
        self.norm2 = nn.Identity() if cfg.qk_norm else nn.LayerNorm(c)
        attn = (c, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias, cfg.qk_norm, cfg.use_mup)
        self.spatial_attn = GenieAttention(*attn)
        self.temporal_attn = GenieAttention(*attn)
        self.mlp = Mlp(c, int(c * cfg.mlp_ratio), act_layer=nn.GELU, bias=cfg.mlp_bias, drop=cfg.mlp_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, s, c = x.shape
        x = x + self.spatial_attn(self.norm1(x).reshape(b * t, s, c)).view(b, t, s, c)
        xt = x.transpose(1, 2).reshape(b * s, t, c)
        x = x + self.temporal_attn(xt, causal=True).view(b, s, t, c).transpose(1, 2)
        return x + self.mlp(self.norm2(x))


class FactorizedEmbedding(nn.Module):
    """emb(x) = sum_i E_i[(x // V^i) mod V] for real tokens, ``mask_token_embed`` for the mask id."""

    def __init__(self, factors: int, vocab: int, dim: int, mask_id: int):
        super().__init__()
        self.factors, self.vocab, self.mask_id = factors, vocab, mask_id
        self.factored_embeds = nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(factors))
        self.mask_token_embed = nn.Parameter(torch.zeros(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_mask = x == self.mask_id
        digits = factorize(x.masked_fill(is_mask, 0), self.factors, self.vocab)
        emb = sum(e(digits[..., i]) for i, e in enumerate(self.factored_embeds))
        return torch.where(is_mask.unsqueeze(-1), self.mask_token_embed.to(emb.dtype), emb)


def factorize(x: torch.Tensor, factors: int, vocab: int) -> torch.Tensor:
    """(...,) tokens -> (..., factors) digits, digit 0 the least significant."""
    return torch.stack([(x // vocab ** i) % vocab for i in range(factors)], dim=-1)


def unfactorize(digits: torch.Tensor, vocab: int) -> torch.Tensor:
    return sum(digits[..., i] * vocab ** i for i in range(digits.shape[-1]))


class GenieDecoder(nn.Module):
    def __init__(self, cfg: GenieConfig):
        super().__init__()
        self.layers = nn.ModuleList(STBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Genie(nn.Module):
    """Tokens (B, T*S) or (B, T, H, W), mask id = image_vocab_size -> logits (B, F*V, T, H, W), channel f*V + v
    (the released model's layout)."""

    def __init__(self, cfg: GenieConfig):
        super().__init__()
        self.cfg = cfg
        c, f, v = cfg.d_model, cfg.num_factored_vocabs, cfg.factored_vocab_size
        side = math.isqrt(cfg.S)
        self.token_shape = (cfg.T, side, side)
        self.vocab_size = cfg.image_vocab_size
        self.mask_id = cfg.image_vocab_size
        self.num_factors, self.factor_vocab = f, v
        self.pos_embed_TSC = nn.Parameter(torch.zeros(1, cfg.T, cfg.S, c))
        self.token_embed = FactorizedEmbedding(f, v, c, self.mask_id)
        self.decoder = GenieDecoder(cfg)
        self.out_x_proj = nn.Linear(c, f * v)
        self.readout_div = cfg.d_model / 256 if cfg.use_mup else 1.0  # muP readout: base width 256
        self.num_classes = 0  # not a classifier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        t, h, w = self.token_shape
        x = self.token_embed(tokens.reshape(b, t, h * w)) + self.pos_embed_TSC
        x = self.decoder(x)
        logits = self.out_x_proj(x / self.readout_div if self.readout_div != 1.0 else x)  # (B, T, S, F*V)
        return logits.permute(0, 3, 1, 2).reshape(b, -1, t, h, w)

    def factor_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, F*V, T, H, W) -> (B, V, F, T, H, W): class dim 1 for cross_entropy, one slot per factor."""
        b, _, t, h, w = logits.shape
        return logits.view(b, self.num_factors, self.factor_vocab, t, h, w).transpose(1, 2)

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random tokens with the later half of the frames partly masked (for the upcycling check)."""
        t, h, w = self.token_shape
        tokens = torch.randint(0, self.vocab_size, (batch, t, h, w), generator=generator)
        drop = torch.rand(batch, t, h, w, generator=generator) < 0.3
        drop[:, : max(1, t // 2)] = False
        return tokens.masked_fill(drop, self.mask_id).to(self.pos_embed_TSC.device)

    def init_weights(self, std: float = 0.02) -> None:
        """Small normal init (the original's muP init without width scaling); pos/mask embeddings stay 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)


# timm's per-model defaults (no weights through timm: they come from the Hub folder's config.json + safetensors)
default_cfgs = generate_default_cfgs({name: {"num_classes": -1, "license": "apache-2.0"}
                                      for name in ("genie", "genie_35m", "genie_138m")})


def _from_fields(**config) -> Genie:
    unknown = set(config) - {f.name for f in fields(GenieConfig)} - {"factored_vocab_size"}
    if unknown:
        raise TypeError(f"unknown GENIE config field(s): {', '.join(sorted(unknown))}")
    return Genie(GenieConfig.from_dict(config))


def _create(variant: str, pretrained: bool, config: dict) -> Genie:
    if pretrained:
        raise ValueError("GENIE weights load from `hf-hub:1x-technologies/GENIE_35M` or a local folder, not "
                         "through timm's pretrained=True")
    return build(_from_fields, variant, **config)


@register_model
def genie(pretrained: bool = False, **config) -> Genie:
    """GENIE from config fields: ``timm.create_model("genie", num_layers=2, num_heads=2, d_model=64, ...)``."""
    return _create("genie", pretrained, config)


GENIE_35M = {"num_layers": 32, "num_heads": 8, "d_model": 256, "T": 16, "S": 256, "image_vocab_size": 262144,
             "num_factored_vocabs": 2, "use_mup": True, "qk_norm": False, "qkv_bias": False, "proj_bias": True,
             "mlp_ratio": 4.0, "mlp_bias": True}


@register_model
def genie_35m(pretrained: bool = False, **config) -> Genie:
    """The released GENIE_35M shape (32 layers, d 256, 8 heads, 2 x 512 factored vocab). Its hub config.json
    is authoritative; ``use_mup`` (most likely true) and ``qk_norm`` are read from it when loading from the hub."""
    return _create("genie_35m", pretrained, {**GENIE_35M, **config})


@register_model
def genie_138m(pretrained: bool = False, **config) -> Genie:
    """The released GENIE_138M shape as far as its file size tells (32 layers, d 512; 8 heads assumed)."""
    return _create("genie_138m", pretrained, {**GENIE_35M, "d_model": 512, **config})
