"""Our model families registered with timm: built through timm's ``build_model_with_cfg`` (which sets the
model's ``pretrained_cfg`` and takes timm's loading keywords), without timm's image-classifier defaults."""

from __future__ import annotations

from timm.models import build_model_with_cfg

IMAGE_KWARGS = ("num_classes", "in_chans", "global_pool")  # timm fills these from the default cfg: not our fields


def build(model_cls, variant: str, **kwargs):
    """``model_cls(**kwargs)`` as timm builds its own models (no pretrained weights through timm)."""
    return build_model_with_cfg(model_cls, variant, False, kwargs_filter=IMAGE_KWARGS, **kwargs)
