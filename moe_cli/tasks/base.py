"""What a task is: everything the loop, `moe eval`, `moe inspect` and the recipe need of an objective, declared on
its class so that nothing outside the task's module compares task names."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_cli.config import DataCfg, ModelCfg, section_from
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.protocols import is_token_model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def evaluation(fn):
    """Decorate a task's ``evaluate(self, model, ...)``: run it without gradients and in eval mode, and give the
    model back in the mode it was in."""
    @functools.wraps(fn)
    def wrapper(self, model: nn.Module, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(self, model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapper


def section(cls, config: dict):
    """The config dataclass ``cls`` from a recipe section or a checkpoint's task_config (which holds other keys
    too), typed and checked as in a recipe."""
    return section_from(cls, config, "task_config", "the checkpoint metadata")


@dataclass(frozen=True)
class Metric:
    """One figure a task's ``evaluate`` returns, and how `moe eval` shows it."""

    key: str  # the key in what Task.evaluate returns
    label: str  # its row in `moe eval`'s table
    percent: bool = False  # shown as a percentage
    asked_by: str = ""  # the `moe eval --metric` name that asks for it (default: key)
    json: tuple[str, ...] = ()  # where `moe eval --json` puts it (default: (asked_by,))
    higher: bool | None = None  # higher is better (train.keep_best); default: percentages are, the rest are not

    @property
    def better(self) -> bool:
        return self.percent if self.higher is None else self.higher

    @property
    def name(self) -> str:
        return self.asked_by or self.key

    @property
    def path(self) -> tuple[str, ...]:
        return self.json or (self.name,)


@dataclass(frozen=True)
class TaskData:
    """The data a task trains on."""

    names: tuple[str, ...] = ()  # the `data.name` values it trains on, and only it; () = image data
    help: str = "images: digits, an ImageFolder or a timm dataset"  # what that data is, for messages
    folder: str = "an image folder"  # what `moe eval --data` must hold
    val_split: str = DataCfg.val_split  # the validation split when the recipe names none


class Task:
    """An objective: its recipe section, the data it trains on, how it prepares, trains and evaluates a model, and
    what `moe eval` reports of it. A new task is one module with a subclass of this and one line in the registry
    (:mod:`moe_cli.tasks`)."""

    name = ""
    Config: type | None = None  # its recipe section's dataclass (a Checked), if it has one
    section = ""  # the recipe key of that section (`mae`, `masked_tokens`, ...)
    data = TaskData()  # the data it trains on
    metrics: tuple[Metric, ...] = ()  # what `evaluate` returns that `moe eval` shows, in table order
    default_metrics = ""  # `moe eval` without --metric
    unit = "image"  # what one model input is (GFLOPs per image / clip, images or clips per second)
    produces = ""  # what the model outputs, for the note when a metric does not apply
    decoder = False  # lpips runs through a token decoder (user code, imported only when the user names it)
    distillable = False  # `moe densify-to-sparse` applies (its stage reports are this task's quality)
    routing_maps = False  # `moe inspect` maps its routing per class and per image patch

    def __init__(self, cfg=None, label_smoothing: float = 0.0):
        self.cfg = cfg if cfg is not None else (self.Config() if self.Config is not None else None)
        self.label_smoothing = label_smoothing

    @staticmethod
    def inputs_per_sample(samples: torch.Tensor) -> int:
        """How many ``unit`` one sample of a batch is (1; a language model's sequence: its tokens)."""
        return 1

    @classmethod
    def from_config(cls, config: dict | None = None, label_smoothing: float = 0.0) -> Task:
        """Built from its recipe section or a checkpoint's task_config (keys it does not know are ignored)."""
        cfg = section(cls.Config, config or {}) if cls.Config is not None else None
        return cls(cfg, label_smoothing)

    def stored_config(self, data: DataCfg) -> dict:
        """What a checkpoint of this task keeps as its task_config (its section, and for token tasks the data it
        was trained on)."""
        return dataclasses.asdict(self.cfg) if self.cfg is not None else {}

    @classmethod
    def check_data(cls, data: DataCfg, label) -> None:
        """Rules on the recipe's `data` section that only this task has (``label``: the recipe's words)."""

    @classmethod
    def default_data(cls, data: DataCfg, model: ModelCfg) -> DataCfg:
        """The recipe's data section with what this task fills in from the model section (nothing by default)."""
        return data

    def eval_data(self, data: str | None, task_config: dict) -> DataCfg | None:
        """The data `moe eval` reads for a checkpoint of this task: ``data`` (--data) or what the checkpoint was
        trained on; None: the image data rule (digits, or an image folder)."""
        return None

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        """Turn the recipe's loaded source into the model this task trains (wrap it, swap its head, check it)."""
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """The training loss and logs as detached tensors (the loop reads them only at log steps)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        raise NotImplementedError


class TokenTask(Task):
    """Objectives whose model predicts video tokens (masked-tokens, genie): token data, kept in the checkpoint so
    that `moe eval` finds it again, figures per clip, LPIPS through a token decoder."""

    @staticmethod
    def figures(accuracy: str, ce: str, lpips: str) -> tuple[Metric, ...]:
        """The three figures of a token task (token accuracy, CE, LPIPS of decoded frames), with its labels."""
        return (Metric("accuracy", accuracy, percent=True, json=("accuracy", "top1")), Metric("ce", ce),
                Metric("lpips", lpips))

    produces = "token predictions"
    default_metrics = "ce,accuracy,routing,flops"
    unit = "clip"
    decoder = True

    @classmethod
    def check_data(cls, data: DataCfg, label) -> None:
        if not data.root:
            raise ConfigError(f"{label('root')} is required for {cls.data.help} ({cls.data.folder})")

    def stored_config(self, data: DataCfg) -> dict:
        return {**super().stored_config(data), "data_root": data.root, "val_split": data.val_split,
                "stride": data.stride}

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        if not is_token_model(ckpt.model):
            raise ConfigError(f"task {self.name} needs a token model such as maskgit_video; {model.source} is a "
                              f"{type(ckpt.model).__name__}")
        ckpt.task_config = self.stored_config(data)
        return ckpt

    def eval_data(self, data: str | None, task_config: dict) -> DataCfg:
        root = data or task_config.get("data_root")
        if data is None and (not root or not Path(root).is_dir()):
            raise ConfigError(f"this {self.name} checkpoint was trained on token data at {root}, which is not here; "
                              f"pass --data FOLDER ({self.data.folder})")
        stored = {"val_split": task_config.get("val_split", self.data.val_split),
                  "stride": task_config.get("stride", DataCfg.stride)}
        return section_from(DataCfg, {"name": self.data.names[0], "root": root, **stored}, "task_config",
                            "the checkpoint metadata")
