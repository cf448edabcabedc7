"""Masked autoencoder (He et al., 2021) around a timm VisionTransformer encoder, registered with timm as `mae_vit`.

The encoder sees only the visible patches (random masking, ratio 0.75 by default); a light transformer decoder
predicts the pixels of the masked ones. Upcycling touches only the encoder (``moe_scope``), so MoE layers sit
where they will stay when a classifier is fine-tuned from the encoder.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from moe_cli.models.registry import build

EVAL_MASK_SEED = 0  # eval-mode masks are drawn from this seed: metrics are comparable across checkpoints


class MaskedAutoencoder(nn.Module):
    moe_scope = "encoder."  # surgery looks for FFNs to upcycle under this prefix only

    def __init__(self, encoder: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        if type(encoder) is not VisionTransformer:
            raise ValueError(f"the mae task needs a timm VisionTransformer encoder, got {type(encoder).__name__}")
        if getattr(encoder, "dynamic_img_size", False):
            raise ValueError("the mae task needs a fixed image size (dynamic_img_size=False)")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be divisible by decoder_heads ({decoder_heads})")
        encoder.reset_classifier(0)
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        pe = encoder.patch_embed
        self.patch_size, self.grid = tuple(pe.patch_size), tuple(pe.grid_size)
        self.in_chans = pe.proj.in_channels
        n = self.grid[0] * self.grid[1]
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size[0] * self.patch_size[1] * self.in_chans)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def random_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, patches) bool, True = masked: exactly round(ratio * patches) per image, at least one visible."""
        n = self.num_patches
        n_mask = min(n - 1, max(1, round(self.mask_ratio * n)))
        scores = torch.rand(batch, n, generator=generator, device="cpu" if generator is not None else device)
        return (scores.argsort(-1).argsort(-1) < n_mask).to(device)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches; returns (B, visible patches, D) latents without the prefix tokens."""
        enc = self.encoder
        x = enc.patch_embed(images)
        b, n, d = x.shape
        npt = enc.num_prefix_tokens
        pos = enc.pos_embed
        prefix_pos = None
        if pos is not None:
            if enc.no_embed_class:
                x = x + pos
            else:
                x, prefix_pos = x + pos[:, npt:], pos[:, :npt]
        keep = (~mask).nonzero()[:, 1].view(b, -1)  # every row keeps the same number of patches
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, d))
        prefix = [t.expand(b, -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if prefix:
            p = torch.cat(prefix, dim=1)
            x = torch.cat([p + prefix_pos if prefix_pos is not None else p, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        # timm moves the final norm to fc_norm for average pooling; use whichever holds it
        norm = enc.norm if not isinstance(enc.norm, nn.Identity) else getattr(enc, "fc_norm", enc.norm)
        return norm(x)[:, npt:]

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = latent.shape[0]
        x = self.decoder_embed(latent)
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1).clone()
        full[~mask] = x.reshape(-1, x.shape[-1])
        x = self.decoder_blocks(full + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted patches (B, patches, p*p*C) in the loss's target space. Without ``mask``, a random one is
        drawn: from the global RNG in training, from a fixed seed in eval mode (reproducible metrics)."""
        if mask is None:
            gen = None if self.training else torch.Generator().manual_seed(EVAL_MASK_SEED)
            mask = self.random_mask(images.shape[0], images.device, gen)
        return self.forward_decoder(self.forward_encoder(images, mask), mask)

    # -- pixels <-> patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, patches, ph*pw*C) in the patch embedding's row-major order."""
        b, c = images.shape[:2]
        (ph, pw), (gh, gw) = self.patch_size, self.grid
        x = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, ph * pw * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        (ph, pw), (gh, gw), c = self.patch_size, self.grid, self.in_chans
        x = patches.reshape(b, gh, gw, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * ph, gw * pw)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        t = self.patchify(images.float())
        if self.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches (per-patch normalised targets when norm_pix_loss)."""
        per_patch = (pred.float() - self.target(images)).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)

    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images with the masked patches replaced by the prediction (in pixel space, clamped to [-1, 1])."""
        pred = pred.float()
        orig = self.patchify(images.float())
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch's statistics (as MAE does)
            pred = pred * (orig.var(-1, keepdim=True) + 1e-6).sqrt() + orig.mean(-1, keepdim=True)
        patches = torch.where(mask[..., None], pred, orig)
        return self.unpatchify(patches).clamp(-1, 1)


def mae_kwargs(encoder: str, encoder_kwargs: dict, decoder_dim: int, decoder_depth: int, decoder_heads: int,
               mask_ratio: float, norm_pix_loss: bool) -> dict:
    """The `mae_vit` kwargs a checkpoint stores to rebuild the wrapper (the encoder is rebuilt without a head)."""
    return {"encoder": encoder, "encoder_kwargs": {**encoder_kwargs, "num_classes": 0}, "decoder_dim": decoder_dim,
            "decoder_depth": decoder_depth, "decoder_heads": decoder_heads, "mask_ratio": mask_ratio,
            "norm_pix_loss": norm_pix_loss}


default_cfgs = generate_default_cfgs({"mae_vit": {"num_classes": -1}})  # weights: the encoder's, below


@register_model
def mae_vit(pretrained: bool = False, encoder: str = "vit_base_patch16_224", encoder_kwargs: dict | None = None,
            **kwargs) -> MaskedAutoencoder:
    """timm entrypoint: ``timm.create_model("mae_vit", encoder="vit_tiny_patch16_224", encoder_kwargs={...})``;
    ``pretrained`` loads the encoder's pretrained weights."""
    enc = timm.create_model(encoder, pretrained=pretrained, **(encoder_kwargs or {}))
    return build(MaskedAutoencoder, "mae_vit", encoder=enc, **kwargs)
