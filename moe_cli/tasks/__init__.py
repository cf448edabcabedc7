"""Tasks: each owns how the recipe's model is prepared (head / wrapper), its loss and its metrics.

- `classify` (:mod:`.classify`): cross-entropy; top-1/top-5 accuracy and CE. Starts from an MAE checkpoint's
  encoder when given one.
- `mae` (:mod:`.mae`): masked-autoencoder pretraining of a timm ViT (moe_cli.models.mae); masked-patch loss,
  pixel MSE, LPIPS.
- `masked-tokens` (:mod:`.masked_tokens`): MaskGIT-style masked-token modelling over video tokens
  (moe_cli.models.video); cosine mask schedule, CE / accuracy on masked tokens, LPIPS of decoded frames through
  a user decoder (module:function).
- `genie` (:mod:`.genie`): the 1X GENIE objective (corruption + MaskGIT masking, factored CE) and its evaluation
  protocol (frame-by-frame greedy MaskGIT generation; CE, token accuracy, LPIPS).

A task is built from its recipe section (or a checkpoint's stored ``task_config``) by ``TASK_TYPES[name]``.
"""

from __future__ import annotations

import dataclasses

from moe_cli.config import TASKS, Recipe
from moe_cli.errors import ConfigError
from moe_cli.tasks.base import Task, unwrap
from moe_cli.tasks.classify import ClassifyTask
from moe_cli.tasks.genie import GenieTask
from moe_cli.tasks.mae import MAETask
from moe_cli.tasks.masked_tokens import MaskedTokensTask, fill_masked, token_mask

TASK_TYPES: dict[str, type[Task]] = {t.name: t for t in (ClassifyTask, MAETask, MaskedTokensTask, GenieTask)}


def make_task(name: str, config: dict | None = None, label_smoothing: float = 0.0) -> Task:
    """The task called ``name``; ``config`` is its recipe section (`mae` / `masked_tokens`) or a checkpoint's
    stored task_config (keys the task does not know are ignored)."""
    if name not in TASK_TYPES:
        raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASK_TYPES[name].from_config(config or {}, label_smoothing)


def recipe_task(recipe: Recipe) -> Task:
    cls = TASK_TYPES[recipe.task]
    section = getattr(recipe, cls.section) if cls.section else None
    return make_task(recipe.task, dataclasses.asdict(section) if section else None, recipe.train.label_smoothing)


__all__ = ["TASK_TYPES", "ClassifyTask", "GenieTask", "MAETask", "MaskedTokensTask", "Task", "fill_masked", "make_task",
           "recipe_task", "token_mask", "unwrap"]
