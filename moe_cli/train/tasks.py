"""Objectives and their metrics. `classify`: cross-entropy loss, top-1/top-5 accuracy and CE on a loader."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.models.surgery import moe_layers

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def aux_loss(model: nn.Module, load_balance: float, z_loss: float) -> tuple[torch.Tensor | None, dict]:
    """Weighted MoE aux losses of the last forward, averaged over MoE layers."""
    layers = [m for _, m in moe_layers(model) if m.aux_losses]
    if not layers:
        return None, {}
    lb = torch.stack([m.aux_losses["load_balance"] for m in layers]).mean()
    z = torch.stack([m.aux_losses["z_loss"] for m in layers]).mean()
    dropped = torch.stack([m.last_dropped for m in layers]).mean()
    return load_balance * lb + z_loss * z, {"load_balance": lb.item(), "z_loss": z.item(),
                                            "dropped": dropped.item()}


def expert_imbalance(model: nn.Module) -> float | None:
    """Mean over MoE layers of max/mean tokens per expert in the last forward (1.0 = perfectly balanced)."""
    ratios = []
    for _, m in moe_layers(model):
        if m.last_counts is not None and m.last_counts.sum() > 0:
            c = m.last_counts.float()
            ratios.append((c.max() / c.mean()).item())
    return sum(ratios) / len(ratios) if ratios else None


class ClassifyTask:
    name = "classify"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict:
        was_training = model.training
        model.eval()
        n, correct1, correct5, ce_sum = 0, 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x).float()
            ce_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(-1).sum().item()
            n += len(y)
        model.train(was_training)
        if n == 0:
            return {"accuracy": math.nan, "top5": math.nan, "ce": math.nan}
        return {"accuracy": correct1 / n, "top5": correct5 / n, "ce": ce_sum / n}


def make_task(name: str, label_smoothing: float = 0.0) -> ClassifyTask:
    if name != "classify":
        raise ValueError(f"unknown task {name!r}")
    return ClassifyTask(label_smoothing)
