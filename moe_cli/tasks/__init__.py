"""Tasks: each is one module whose :class:`~moe_cli.tasks.base.Task` subclass owns its recipe section, the data it
trains on, how it prepares, trains and evaluates a model, and what `moe eval` reports of it.

- `classify` (:mod:`.classify`): cross-entropy; top-1/top-5 accuracy and CE. Starts from an MAE checkpoint's
  encoder when given one.
- `mae` (:mod:`.mae`): masked-autoencoder pretraining of a timm ViT (moe_cli.models.mae); masked-patch loss,
  pixel MSE, LPIPS.
- `masked-tokens` (:mod:`.masked_tokens`): MaskGIT-style masked-token modelling over video tokens
  (moe_cli.models.video); cosine mask schedule, CE / accuracy on masked tokens, LPIPS of decoded frames through
  a user decoder (module:function).
- `genie` (:mod:`.genie`): the 1X GENIE objective (corruption + MaskGIT masking, factored CE) and its evaluation
  protocol (frame-by-frame greedy MaskGIT generation; CE, token accuracy, LPIPS).
- `causal-lm` (:mod:`.causal_lm`): next-token prediction for transformers causal LMs; CE, perplexity, accuracy.

A new task is one module and one line in :data:`TASKS` below (or :func:`register` from outside the package).
"""

from __future__ import annotations

from pathlib import Path

from moe_cli.errors import ConfigError
from moe_cli.tasks.base import Metric, Task, TaskData, TokenTask, unwrap
from moe_cli.tasks.causal_lm import CausalLMTask
from moe_cli.tasks.classify import ClassifyTask
from moe_cli.tasks.genie import GenieTask
from moe_cli.tasks.mae import MAETask
from moe_cli.tasks.masked_tokens import MaskedTokensTask, fill_masked, token_mask

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    ClassifyTask,
    MAETask,
    MaskedTokensTask,
    GenieTask,
    CausalLMTask,
)}
EVAL_METRICS = ("routing", "flops", "throughput")  # what `moe eval` measures of every task's model


def register(task: type[Task]) -> type[Task]:
    """Add a task to the registry (usable as a class decorator); its name must be new."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered ({TASKS[task.name].__name__})")
    TASKS[task.name] = task
    return task


def task_class(name: str, where: str = "task") -> type[Task]:
    """The registered task called ``name``; ``where`` names the field in the caller's words."""
    if name not in TASKS:
        raise ConfigError(f"{where} must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def make_task(name: str, config: dict | None = None, label_smoothing: float = 0.0) -> Task:
    """The task called ``name``; ``config`` is its recipe section or a checkpoint's stored task_config (keys the
    task does not know are ignored)."""
    return task_class(name).from_config(config, label_smoothing)


def sections() -> dict[str, type]:
    """Recipe key -> config dataclass of every registered task's section."""
    return {t.section: t.Config for t in TASKS.values() if t.section and t.Config is not None}


def data_owner(data_name: str) -> type[Task] | None:
    """The task that alone trains on `data.name: data_name` (token formats), if any."""
    return next((t for t in TASKS.values() if data_name in t.data.names), None)


def metric_names() -> tuple[str, ...]:
    """Every `moe eval --metric` name: the registered tasks' quality metrics, then routing, flops, throughput."""
    names = dict.fromkeys(m.name for t in TASKS.values() for m in t.metrics)
    return (*names, *EVAL_METRICS)


def eval_data(data: str | None, ckpt=None, where: str = "this checkpoint", flag: str = "--data"):
    """The data `moe eval`, `moe inspect` and calibration read for ``ckpt``: ``data`` (--data: digits,
    lm-synthetic, hfds/NAME, a folder), or by default what the checkpoint says it was trained on (its task's record,
    or the data section a `moe finetune` run stored); without either, one line asking for ``--data`` — never
    another data set."""
    from moe_cli.config import DataCfg, section_from
    from moe_cli.data.loaders import data_from_spec

    if data == "digits":
        return DataCfg(name="digits")
    if ckpt is None:
        return DataCfg(name="digits") if data is None else DataCfg(name="", root=data)
    chosen = make_task(ckpt.task, ckpt.task_config).eval_data(data, ckpt.task_config)
    if chosen is not None:
        return chosen
    if data is not None:
        return data_from_spec(data, ckpt.model)
    record = ckpt.extra.get("data")
    if not isinstance(record, dict):
        raise ConfigError(f"{where} does not record the data it was trained on (it was not trained by "
                          f"`moe finetune`, or by a moe-cli before 0.3); pass {flag} (digits, an image folder, "
                          "hfds/NAME)")
    fields = {k: v for k, v in record.items() if k != "classes"}
    cfg = section_from(DataCfg, fields, "data", "the checkpoint metadata")
    if cfg.root is not None and not cfg.name.startswith(("hfds/", "hfids/", "tfds/", "wds/")) \
            and not Path(cfg.root).exists():
        raise ConfigError(f"{where} was trained on `{cfg.name or 'ImageFolder'}` at {cfg.root}, which is not here; "
                          f"pass {flag} FOLDER")
    return cfg


def reporting(metric: str) -> list[str]:
    """The registered tasks whose evaluation reports ``metric``."""
    return [name for name, t in TASKS.items() if any(m.name == metric for m in t.metrics)]


__all__ = ["EVAL_METRICS", "TASKS", "CausalLMTask", "ClassifyTask", "GenieTask", "MAETask", "MaskedTokensTask",
           "Metric", "Task", "TaskData", "TokenTask", "data_owner", "eval_data", "fill_masked", "make_task",
           "metric_names", "register", "reporting", "sections", "task_class", "token_mask", "unwrap"]
