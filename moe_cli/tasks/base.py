"""What the loop and `moe eval` need of an objective."""

from __future__ import annotations

import torch
from torch import nn

from moe_cli.config import Recipe, section_from
from moe_cli.io.checkpoint import Checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "token_shape")


def section(cls, config: dict):
    """The config dataclass ``cls`` from a recipe section or a checkpoint's task_config (which holds other keys
    too), typed and checked as in a recipe."""
    return section_from(cls, config, "task_config", "the checkpoint metadata")


class Task:
    """What the loop and `moe eval` need of an objective."""

    name = ""
    section = ""  # the recipe section that configures it (`mae`, `masked_tokens`), if any
    quality: frozenset[str] = frozenset()  # the `moe eval` quality metrics (accuracy, ce, mse, lpips) it reports
    produces = ""  # what the model outputs, for the note when a metric does not apply
    default_metrics = ""  # `moe eval` without --metric

    @classmethod
    def from_config(cls, config: dict, label_smoothing: float = 0.0) -> Task:
        """Built from its recipe section or a checkpoint's task_config."""
        return cls()

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        """Turn the recipe's loaded source into the model this task trains (wrap it, swap its head, check it)."""
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """The training loss and logs as detached tensors (the loop reads them only at log steps)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        raise NotImplementedError


class TokenTask(Task):
    """Objectives whose model predicts masked video tokens (masked-tokens, genie): what `moe eval` reports."""

    quality = frozenset({"ce", "accuracy", "lpips"})
    produces = "token predictions"
    default_metrics = "ce,accuracy,routing,flops"
