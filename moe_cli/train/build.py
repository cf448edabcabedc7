"""The model a run trains: the recipe's source, prepared by its task, upcycled when the recipe says so."""

from __future__ import annotations

from moe_cli.config import Recipe
from moe_cli.data.loaders import calibration_batches
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.io.sources import load_source
from moe_cli.models.upcycle import TOLERANCE, Upcycled, upcycle_verified
from moe_cli.moe.config import UpcycleCfg
from moe_cli.tasks import Task, recipe_task


def upcycle_checkpoint(ckpt: Checkpoint, cfg: UpcycleCfg, *, seed: int = 0, verify: bool = False,
                       tolerance: float = TOLERANCE) -> Upcycled:
    """Upcycle ``ckpt``'s dense model in place (calibration data loaded for a data-driven router init), recording
    how its experts were made and the dense size."""
    if ckpt.moe is not None:
        raise ConfigError(f"{ckpt.source or 'the model'} is already an MoE checkpoint ({ckpt.moe.experts} experts)")
    calib = calibration_batches(ckpt.model, cfg.calib, cfg.calib_batches, ckpt.data_config) \
        if cfg.router_init != "random" else None
    up = upcycle_verified(ckpt.model, cfg, seed=seed, verify=verify, tolerance=tolerance, calibration=calib)
    ckpt.model, ckpt.init = up.model, cfg.init
    ckpt.extra = {**ckpt.extra, "dense_params": up.dense_params}
    return up


def build_model(recipe: Recipe, task: Task | None = None) -> Checkpoint:
    """The recipe's model: its source prepared by the task (MAE wrapper, classifier from an MAE encoder, ...),
    then upcycled when `model.upcycle` is set (for an MAE: the encoder's FFNs)."""
    m = recipe.model
    ckpt = load_source(m.source, pretrained=m.pretrained, arch=m.arch, model_kwargs=m.kwargs)
    ckpt = (task or recipe_task(recipe)).prepare(ckpt, recipe)
    if m.upcycle is not None:
        if ckpt.moe is not None:
            raise ConfigError(f"`model.upcycle` is set but {m.source} is already an MoE checkpoint")
        upcycle_checkpoint(ckpt, m.upcycle, seed=recipe.train.seed)
    ckpt.task = recipe.task
    return ckpt
