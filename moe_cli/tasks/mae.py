"""`mae`: masked-autoencoder pretraining of a timm ViT (moe_cli.models.mae); masked-patch loss, pixel MSE, LPIPS."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moe_cli.config import MAECfg, Recipe
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.mae import EVAL_MASK_SEED, MaskedAutoencoder, mae_kwargs
from moe_cli.runtime import autocast
from moe_cli.tasks.base import Task, section, unwrap
from moe_cli.tasks.lpips import lpips_distance


class MAETask(Task):
    name = "mae"
    section = "mae"
    quality = frozenset({"mse", "lpips"})
    produces = "reconstructed images"
    default_metrics = "mse,routing,flops"

    def __init__(self, cfg: MAECfg | None = None):
        self.cfg = dataclasses.asdict(cfg or MAECfg())

    @classmethod
    def from_config(cls, config: dict, label_smoothing: float = 0.0) -> MAETask:
        return cls(section(MAECfg, config))

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        """Wrap the source ViT (dense or MoE) in an MAE, or continue an MAE checkpoint with the recipe's masking."""
        model = ckpt.model
        if isinstance(model, MaskedAutoencoder):
            model.mask_ratio, model.norm_pix_loss = self.cfg["mask_ratio"], self.cfg["norm_pix_loss"]
            kw = {**ckpt.architecture["kwargs"], "mask_ratio": model.mask_ratio, "norm_pix_loss": model.norm_pix_loss}
            ckpt.architecture = {**ckpt.architecture, "kwargs": kw}
            return ckpt
        try:
            mae = MaskedAutoencoder(model, **self.cfg)
        except ValueError as e:
            raise ConfigError(f"task mae with model {recipe.model.source}: {e}") from None
        ckpt.model = mae
        ckpt.architecture = {"name": "mae_vit", "kwargs": mae_kwargs(ckpt.architecture["name"],
                                                                     ckpt.architecture.get("kwargs", {}), **self.cfg)}
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        images = batch[0]
        mae = unwrap(model)
        mask = mae.random_mask(images.shape[0], images.device)
        loss = mae.loss(images, model(images, mask), mask)
        return loss, {"mae": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        """Masked-patch loss, pixel MSE on the masked patches and (with ``lpips``) LPIPS of the reconstructions
        (visible patches kept, masked ones predicted) against the originals; masks from a fixed seed."""
        mae = unwrap(model)
        was_training = mae.training
        mae.eval()
        gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
        n, loss_sum, se_sum, masked, lp_sum = 0, 0.0, 0.0, 0, 0.0
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            mask = mae.random_mask(images.shape[0], device, gen)
            with autocast(device, precision):
                pred = mae(images, mask)
            loss_sum += mae.loss(images, pred, mask).item() * len(images)
            recon = mae.reconstruct(images, pred, mask)
            err = (mae.patchify(recon) - mae.patchify(images.float())).pow(2).mean(-1)
            se_sum += (err * mask).sum().item()
            masked += int(mask.sum())
            if lpips is not None:
                lp_sum += lpips_distance(recon, images, lpips).sum().item()
            n += len(images)
        mae.train(was_training)
        out = {"loss": loss_sum / max(n, 1), "mse": se_sum / max(masked, 1)}
        if lpips is not None:
            out["lpips"] = lp_sum / max(n, 1)
        return out
