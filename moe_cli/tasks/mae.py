"""`mae`: masked-autoencoder pretraining of a timm ViT (moe_cli.models.mae); masked-patch loss, pixel MSE, LPIPS."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe_cli.checks import Checked, Label, check
from moe_cli.config import DataCfg, ModelCfg
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.lpips import lpips_distance
from moe_cli.models.mae import EVAL_MASK_SEED, MaskedAutoencoder, mae_kwargs
from moe_cli.runtime import autocast
from moe_cli.tasks.base import Metric, Task, evaluation, unwrap


@dataclass(frozen=True)
class MAECfg(Checked):
    """Masked-autoencoder pretraining of the model (a timm ViT) as encoder (recipe section `mae`)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # regress per-patch normalised pixels

    def validate(self, label: Label) -> MAECfg:
        check(0 < self.mask_ratio < 1, label("mask_ratio"), "a number in (0, 1)", self.mask_ratio)
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            check(getattr(self, name) >= 1, label(name), "an integer >= 1", getattr(self, name))
        check(self.decoder_dim % self.decoder_heads == 0, label("decoder_dim"),
              f"divisible by decoder_heads ({self.decoder_heads})", self.decoder_dim)
        return self


class MAETask(Task):
    name = "mae"
    Config = MAECfg
    section = "mae"
    metrics = (Metric("mse", "reconstruction MSE (masked patches)"),
               Metric("loss", "MAE loss", asked_by="mse", json=("mae_loss",)),
               Metric("lpips", "LPIPS (AlexNet)"))
    produces = "reconstructed images"
    default_metrics = "mse,routing,flops"

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        """Wrap the source ViT (dense or MoE) in an MAE, or continue an MAE checkpoint with the recipe's masking."""
        net = ckpt.model
        cfg = dataclasses.asdict(self.cfg)
        if isinstance(net, MaskedAutoencoder):
            net.mask_ratio, net.norm_pix_loss = cfg["mask_ratio"], cfg["norm_pix_loss"]
            kw = {**ckpt.architecture["kwargs"], "mask_ratio": net.mask_ratio, "norm_pix_loss": net.norm_pix_loss}
            ckpt.architecture = {**ckpt.architecture, "kwargs": kw}
            return ckpt
        try:
            mae = MaskedAutoencoder(net, **cfg)
        except ValueError as e:
            raise ConfigError(f"task mae with model {model.source}: {e}") from None
        ckpt.model = mae
        ckpt.architecture = {"name": "mae_vit", "kwargs": mae_kwargs(ckpt.architecture["name"],
                                                                     ckpt.architecture.get("kwargs", {}), **cfg)}
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        images = batch[0]
        mae = unwrap(model)
        mask = mae.random_mask(images.shape[0], images.device)
        loss = mae.loss(images, model(images, mask), mask)
        return loss, {"mae": loss.detach()}

    @evaluation
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        """Masked-patch loss, pixel MSE on the masked patches and (with ``lpips``) LPIPS of the reconstructions
        (visible patches kept, masked ones predicted) against the originals; masks from a fixed seed."""
        mae = unwrap(model)
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
        out = {"loss": loss_sum / max(n, 1), "mse": se_sum / max(masked, 1)}
        if lpips is not None:
            out["lpips"] = lp_sum / max(n, 1)
        return out
