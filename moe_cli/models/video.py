"""A MaskGIT-style bidirectional transformer over discrete video tokens (frames x H x W), registered with timm as
`maskgit_video`. Blocks factorise attention into spatial (within a frame) and temporal (across frames at one
position) and use timm's `Mlp` as FFN, so `moe upcycle maskgit_video ...` and recipes with `model.upcycle` apply.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, trunc_normal_
from timm.layers.attention import Attention
from timm.models import generate_default_cfgs, register_model
from torch import nn

from moe_cli.models.registry import build


class SpaceTimeBlock(nn.Module):
    """Pre-norm spatial attention, temporal attention, FFN; x is (B, F, S, D) with S = H*W tokens a frame."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn_space = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.attn_time = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, s, d = x.shape
        x = x + self.attn_space(self.norm1(x).reshape(b * f, s, d)).view(b, f, s, d)
        t = self.norm2(x).transpose(1, 2).reshape(b * s, f, d)
        x = x + self.attn_time(t).view(b, s, f, d).transpose(1, 2)
        # the FFN sees (batch, tokens, dim) so an MoE layer's per-sequence statistics cover the whole clip
        return x + self.mlp(self.norm3(x).reshape(b, f * s, d)).view(b, f, s, d)


class MaskGitVideo(nn.Module):
    """Logits (B, F, H, W, vocab) for tokens (B, F, H, W); the id ``vocab_size`` is the [MASK] token."""

    def __init__(self, vocab_size: int = 1024, frames: int = 4, height: int = 8, width: int = 8, embed_dim: int = 256,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0):
        super().__init__()
        if min(vocab_size, frames, height, width, depth) < 1 or embed_dim % num_heads:
            raise ValueError("maskgit_video needs positive sizes and embed_dim divisible by num_heads, got "
                             f"vocab_size={vocab_size} frames={frames} height={height} width={width} "
                             f"embed_dim={embed_dim} num_heads={num_heads} depth={depth}")
        self.vocab_size, self.frames, self.height, self.width = vocab_size, frames, height, width
        self.mask_id = vocab_size
        self.embed_dim = embed_dim
        self.tok_embed = nn.Embedding(vocab_size + 1, embed_dim)
        self.pos_time = nn.Parameter(torch.zeros(1, frames, 1, embed_dim))
        self.pos_space = nn.Parameter(torch.zeros(1, 1, height * width, embed_dim))
        self.blocks = nn.ModuleList([SpaceTimeBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)
        for p in (self.pos_time, self.pos_space, self.tok_embed.weight):
            trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def token_shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        if tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens of shape (batch, {self.frames}, {self.height}, {self.width}), "
                             f"got {tuple(tokens.shape)}")
        x = self.tok_embed(tokens.reshape(b, self.frames, -1)) + self.pos_time + self.pos_space
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).view(b, *self.token_shape, self.vocab_size)

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random tokens (no [MASK]) for probes: upcycling verification, FLOPs."""
        device = next(self.parameters()).device
        return torch.randint(0, self.vocab_size, (batch, *self.token_shape), generator=generator).to(device)


default_cfgs = generate_default_cfgs({"maskgit_video": {"num_classes": -1}})


@register_model
def maskgit_video(pretrained: bool = False, **kwargs) -> MaskGitVideo:
    """timm entrypoint: ``timm.create_model("maskgit_video", vocab_size=..., frames=..., height=..., width=...)``."""
    if pretrained:
        raise ValueError("maskgit_video has no pretrained weights; use --no-pretrained / pretrained: false, or "
                         "a trained moe-cli checkpoint")
    return build(MaskGitVideo, "maskgit_video", **kwargs)
