"""The optimizer and the learning-rate schedule of a recipe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from moe_cli.recipe import Recipe


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules exempt through timm's ``no_weight_decay()`` convention (the
    model's own set, and each submodule's, e.g. an MoE layer's stacked biases and hidden norms)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters, grouped by timm's
    ``param_groups_weight_decay``: no decay on biases, 1-d parameters and the ``no_weight_decay()`` names."""
    o = recipe.optim
    groups = param_groups_weight_decay(model, weight_decay=o.weight_decay,
                                       no_weight_decay_list=no_weight_decay_names(model))
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=o.betas)


def lr_lambda(recipe: Recipe, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine to ``min_lr_ratio`` (or constant), as a factor of the base rate."""
    s = recipe.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "constant":
            return 1.0
        t = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor
