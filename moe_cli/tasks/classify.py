"""`classify`: cross-entropy; top-1/top-5 accuracy and CE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.config import DataCfg, ModelCfg
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.mae import MaskedAutoencoder
from moe_cli.models.protocols import is_token_model
from moe_cli.runtime import autocast
from moe_cli.tasks.base import Metric, Task, evaluation


class ClassifyTask(Task):
    name = "classify"
    metrics = (Metric("accuracy", "accuracy top-1", percent=True, json=("accuracy", "top1")),
               Metric("top5", "accuracy top-5", percent=True, asked_by="accuracy", json=("accuracy", "top5")),
               Metric("ce", "cross-entropy"))
    produces = "class scores"
    default_metrics = "accuracy,ce,routing,flops"
    distillable = True
    routing_maps = True

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        if is_token_model(ckpt.model):
            raise ConfigError(f"{model.source} is a token model; train it with `task: masked-tokens`")
        if isinstance(ckpt.model, MaskedAutoencoder):
            num_classes = model.kwargs.get("num_classes")
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ConfigError(f"{model.source} is an MAE; set `model.kwargs.num_classes` to give its "
                                  "encoder a classifier head")
            return mae_encoder(ckpt, num_classes)
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.detach()}

    @evaluation
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
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
        if n == 0:
            return {"accuracy": math.nan, "top5": math.nan, "ce": math.nan}
        return {"accuracy": correct1 / n, "top5": correct5 / n, "ce": ce_sum / n}


def mae_encoder(ckpt: Checkpoint, num_classes: int) -> Checkpoint:
    """The encoder of an MAE checkpoint as a timm classifier with a fresh ``num_classes`` head (MoE layers kept)."""
    kw = ckpt.architecture["kwargs"]
    encoder = ckpt.model.encoder
    encoder.reset_classifier(num_classes)
    arch = {"name": kw["encoder"], "kwargs": {**kw["encoder_kwargs"], "num_classes": num_classes}}
    return Checkpoint(encoder, arch, ckpt.source, "classify", dict(ckpt.extra), data_config=ckpt.data_config)
