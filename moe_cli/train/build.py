"""Checkpoints made from checkpoints: the model a run trains (the recipe's source, prepared by its task, upcycled
when the recipe says so), and a checkpoint with fewer experts (merged, pruned) — what `moe upcycle`, `moe merge`
and `moe prune` call."""

from __future__ import annotations

import dataclasses

from moe_cli.checks import Label, argument, plain
from moe_cli.data.loaders import calibration_batches
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, create_model
from moe_cli.io.sources import load_source
from moe_cli.models.reduce import densify, expert_usage, merge, prune
from moe_cli.models.upcycle import TOLERANCE, Upcycled, upcycle_verified
from moe_cli.moe.config import UpcycleCfg
from moe_cli.recipe import Recipe
from moe_cli.tasks import Task, eval_data


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
    record_upcycle(ckpt, cfg, up.dense_params)
    return up


def record_upcycle(ckpt: Checkpoint, cfg: UpcycleCfg, dense_params: int) -> None:
    """Note in ``ckpt``'s metadata the dense size and the upcycling step of its chain (the model card's)."""
    ckpt.extra = {**ckpt.extra, "dense_params": dense_params}
    record_step(ckpt, "upcycle", {"source": ckpt.source, "settings": changed_settings(cfg)})


def record_step(ckpt: Checkpoint, command: str, settings: dict) -> None:
    """Append one step (``{command: settings}``) to the chain of steps that made ``ckpt`` (the model card's)."""
    ckpt.extra = {**ckpt.extra, "made_with": [*ckpt.extra.get("made_with", []), {command: settings}]}


def changed_settings(cfg: UpcycleCfg) -> dict:
    """The upcycling settings a `moe upcycle` command line would give: experts and k, and those that differ from
    the defaults."""
    default = plain(dataclasses.asdict(UpcycleCfg()))
    return {k: v for k, v in plain(dataclasses.asdict(cfg)).items() if default.get(k) != v or k in ("experts", "k")}


def build_model(recipe: Recipe, task: Task | None = None) -> Checkpoint:
    """The recipe's model: its source prepared by the task (MAE wrapper, classifier from an MAE encoder, ...),
    then upcycled when `model.upcycle` is set (for an MAE: the encoder's FFNs)."""
    m = recipe.model
    ckpt = load_source(m.source, pretrained=m.pretrained, arch=m.arch, model_kwargs=m.kwargs)
    ckpt = (task or recipe.make_task()).prepare(ckpt, m, recipe.data)
    if m.upcycle is not None:
        if ckpt.moe is not None:
            raise ConfigError(f"`model.upcycle` is set but {m.source} is already an MoE checkpoint")
        upcycle_checkpoint(ckpt, m.upcycle, seed=recipe.train.seed)
    ckpt.task = recipe.task
    return ckpt


def calibration(ckpt: Checkpoint, calib: str | None, batches: int) -> list:
    """Calibration inputs read as the checkpoint's model expects them: ``calib`` (digits, lm-synthetic, an image or
    token folder), or by default the data the checkpoint's task evaluates on (digits for image models)."""
    return calibration_batches(ckpt.model, eval_data(calib, ckpt, flag="--calib"), batches, ckpt.data_config)


def merge_checkpoint(ckpt: Checkpoint, experts: int, calib: str | None = None, calib_batches: int = 4,
                     label: Label = argument) -> tuple[Checkpoint, dict[str, list[list[int]]]]:
    """``ckpt`` with every MoE layer merged down to ``experts`` (usage on the calibration data; see
    :func:`moe_cli.models.reduce.merge`); merged to 1, a checkpoint of the dense architecture (plain timm loads
    it). Returns it and the expert groups per layer."""
    groups = merge(ckpt.model, experts, lambda model: expert_usage(model, calibration(ckpt, calib, calib_batches)),
                   label)
    record_step(ckpt, "merge", {"experts": experts})
    if experts == 1:  # the dense architecture; what it was trained on and how it was made stay recorded
        arch = ckpt.architecture
        dense = densify(ckpt.model, create_model(arch["name"], arch.get("kwargs", {})))
        ckpt = Checkpoint(dense.eval(), arch, ckpt.source, ckpt.task, ckpt.extra, ckpt.task_config,
                          data_config=ckpt.data_config)
    return ckpt, groups


def prune_checkpoint(ckpt: Checkpoint, keep: int | None = None, drop_experts: str | None = None,
                     calib: str | None = None, calib_batches: int = 4, label: Label = argument) -> dict[str, list[int]]:
    """Remove experts from ``ckpt`` for good (in place): all but the ``keep`` most used per layer (usage on the
    calibration data), or those ``drop_experts`` names ('layer:expert,...'). Returns the kept experts per layer."""
    kept = prune(ckpt.model, keep, drop_experts, lambda model: expert_usage(model, calibration(ckpt, calib,
                                                                                            calib_batches)), label)
    record_step(ckpt, "prune", {"keep": keep, "drop_experts": drop_experts})
    return kept
