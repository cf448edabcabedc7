"""`causal-lm`: next-token prediction for transformers causal LMs (moe_cli.models.causal_lm); cross-entropy with
transformers' ignore index (-100), perplexity and next-token accuracy, per token."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.checks import Checked, Label, check
from moe_cli.config import DataCfg, ModelCfg, section_from
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.causal_lm import CausalLM
from moe_cli.runtime import autocast
from moe_cli.tasks.base import Metric, Task, TaskData, evaluation

IGNORE_INDEX = -100  # labels transformers' losses skip (padding)


@dataclass(frozen=True)
class CausalLMCfg(Checked):
    """Next-token prediction (recipe section `causal_lm`)."""

    eval_max_batches: int | None = None  # eval: stop after this many validation batches (None: all)

    def validate(self, label: Label) -> CausalLMCfg:
        check(self.eval_max_batches is None or self.eval_max_batches >= 1, label("eval_max_batches"),
              "an integer >= 1 or null (all batches)", self.eval_max_batches)
        return self


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits at positions 0..T-2 against the ids at 1..T-1 (labels -100 are skipped)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class CausalLMTask(Task):
    name = "causal-lm"
    Config, section = CausalLMCfg, "causal_lm"
    data = TaskData(("lm-synthetic", "lm-tokens", "text"), "token sequences (`data.name: lm-synthetic`, built in, "
                    "`lm-tokens`, or `text` tokenized with the model's tokenizer)",
                    "a folder with validation.json and .bin of shape [sequences, length]")
    metrics = (Metric("ce", "next-token cross-entropy"), Metric("perplexity", "perplexity"),
               Metric("accuracy", "next-token accuracy", percent=True, json=("accuracy", "top1")))
    default_metrics = "ce,perplexity,accuracy,routing,flops"
    unit = "token"
    produces = "next-token logits"
    distillable = True

    @classmethod
    def check_data(cls, data: DataCfg, label) -> None:
        if data.name in ("lm-tokens", "text") and not data.root:
            what = cls.data.folder if data.name == "lm-tokens" else "a folder with <split>.txt / .jsonl"
            raise ConfigError(f"{label('root')} is required for `data.name: {data.name}` ({what})")

    @classmethod
    def default_data(cls, data: DataCfg, model: ModelCfg) -> DataCfg:
        """Text is tokenized by the source's own tokenizer unless the recipe names one."""
        if data.name == "text" and data.tokenizer is None and (model.source.startswith("hf-hub:") or
                                                              Path(model.source, "tokenizer_config.json").is_file()):
            return data.replace(tokenizer=model.source)
        return data

    @staticmethod
    def inputs_per_sample(samples: torch.Tensor) -> int:
        return samples.shape[1]  # a sequence of T tokens

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        if not isinstance(ckpt.model, CausalLM):
            raise ConfigError(f"task causal-lm trains transformers causal LMs (a Llama, Mistral, Qwen2, Qwen3 or "
                              f"GPT-2 folder or hf-hub repository); {model.source} is a {type(ckpt.model).__name__}")
        ckpt.task_config = {**self.stored_config(data), "data_name": data.name, "data_root": data.root,
                            "val_split": data.val_split, "tokenizer": data.tokenizer, "seq_len": data.seq_len}
        return ckpt

    def eval_data(self, data: str | None, task_config: dict) -> DataCfg:
        if data is None:
            name, root = task_config.get("data_name", "lm-synthetic"), task_config.get("data_root")
            if name == "lm-tokens" and (not root or not Path(root).is_dir()):
                raise ConfigError(f"this causal-lm checkpoint was trained on the token folder {root}, which is not "
                                  f"here; pass --data FOLDER ({self.data.folder}) or --data lm-synthetic")
        else:
            name, root = ("lm-synthetic", None) if data == "lm-synthetic" else \
                ("text" if task_config.get("data_name") == "text" else "lm-tokens", data)
        stored = {k: task_config[k] for k in ("val_split", "tokenizer", "seq_len") if task_config.get(k) is not None}
        return section_from(DataCfg, {"name": name, "root": root, **stored}, "task_config", "the checkpoint metadata")

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        ids = batch[0]
        loss = next_token_ce(model(ids), ids)
        return loss, {"ce": loss.detach()}

    @evaluation
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        ce_sum, correct, count = 0.0, 0, 0
        for i, batch in enumerate(loader):
            if self.cfg.eval_max_batches is not None and i >= self.cfg.eval_max_batches:
                break
            ids = batch[0].to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(ids).float()
            target = ids[:, 1:]
            valid = target != IGNORE_INDEX
            ce_sum += next_token_ce(logits, ids, reduction="sum").item()
            correct += ((logits[:, :-1].argmax(-1) == target) & valid).sum().item()
            count += int(valid.sum())
        ce = ce_sum / max(count, 1)
        return {"ce": ce, "perplexity": math.exp(min(ce, 80.0)), "accuracy": correct / max(count, 1)}
