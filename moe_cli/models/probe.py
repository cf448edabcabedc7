"""What a model expects as input: a small deterministic probe batch, its input size, its image preprocessing."""

from __future__ import annotations

import torch
from torch import nn

from moe_cli.config import PREPROCESS_FIELDS
from moe_cli.models.protocols import ProbedModel


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: a patch embedding's img_size, else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and hasattr(m, "proj"):
            return int(getattr(m.proj, "in_channels", chans)), int(size[0]), int(size[1])
    return chans, h, w


def probe_batch(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random images shaped like the model's input, or the model's own ``example_input`` (token and language
    models)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, ProbedModel):
        return model.example_input(batch, gen)
    c, h, w = input_size(model)
    device = next(model.parameters()).device
    return torch.randn(batch, c, h, w, generator=gen).to(device)


def model_data_config(model: nn.Module) -> dict:
    """How ``model`` expects images: timm's data config for it (mean, std, interpolation, crop), from its
    ``pretrained_cfg``; models timm does not know get timm's defaults (ImageNet mean / std)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in PREPROCESS_FIELDS if k in cfg}
