"""A new task is one module plus one registry line: a task defined here, registered from outside the package, is
trained by `moe finetune` from its own recipe section and reported by `moe eval` with its own labels."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line, write_recipe

from moe_cli.checks import Checked, check
from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.tasks import TASKS, Metric, Task, register


@dataclass(frozen=True)
class MarginCfg(Checked):
    margin: float = 1.0

    def validate(self, label):
        check(self.margin > 0, label("margin"), "a number > 0", self.margin)
        return self


class MarginTask(Task):
    """Multi-class hinge loss; reports the error rate and the mean margin of the true class."""

    name = "margin-classify"
    Config = MarginCfg
    section = "margin"
    metrics = (Metric("error", "error rate (toy task)", percent=True), Metric("margin", "mean true-class margin"))
    default_metrics = "error,margin,routing"
    produces = "class scores"

    def loss(self, model, batch):
        x, y = batch
        loss = F.multi_margin_loss(model(x).float(), y, margin=self.cfg.margin)
        return loss, {"hinge": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model, loader, device, precision="fp32", lpips=None):
        was = model.training
        model.eval()
        wrong, margin, n = 0, 0.0, 0
        for x, y in loader:
            logits = model(x.to(device)).float()
            y = y.to(device)
            true = logits.gather(1, y[:, None])[:, 0]
            other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
            wrong += int((logits.argmax(1) != y).sum())
            margin += float((true - other).sum())
            n += len(y)
        model.train(was)
        return {"error": wrong / n, "margin": margin / n}


@pytest.fixture
def margin_task():
    register(MarginTask)
    yield MarginTask
    del TASKS[MarginTask.name]


def test_a_registered_task_trains_from_its_section_and_evaluates_with_its_labels(cli, tmp_path, margin_task):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", task="margin-classify", margin={"margin": 0.5},
                     train={"steps": 3, "batch_size": 16, "log_every": 1})
    r = cli("finetune", f)
    assert r.exit_code == 0, r.output
    assert "error" in r.output and "margin" in r.output  # its own evaluation at the end of training
    ckpt = load_checkpoint(tmp_path / "out" / "final")
    assert ckpt.task == "margin-classify"
    r = cli("eval", str(tmp_path / "out" / "final"))
    assert r.exit_code == 0, r.output
    assert "error rate (toy task)" in r.output and "mean true-class margin" in r.output
    assert "accuracy top-1" not in r.output and "GFLOPs / image" not in r.output  # its defaults: no flops
    assert "routing" not in r.output or "routing per MoE layer" not in r.output  # a dense model: no MoE layers
    out = json.loads(cli("eval", str(tmp_path / "out" / "final"), "--metric", "error,margin", "--json").stdout)
    assert 0 <= out["error"] <= 1 and isinstance(out["margin"], float)
    assert "does not apply" in json.loads(cli("eval", str(tmp_path / "out" / "final"), "--metric", "ce",
                                              "--json").stdout)["ce"]["skipped"]


def test_a_registered_task_section_is_checked_in_the_recipes_words(cli, tmp_path, margin_task):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", task="margin-classify", margin={"margin": -1})
    one_line(cli("finetune", f), "`margin.margin` in r.yaml must be a number > 0, got -1.0")
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", task="margin-classify", margin={"margn": 1})
    one_line(cli("finetune", f), "unknown key `margin.margn` in r.yaml — did you mean `margin.margin`?")
    assert not (tmp_path / "out").exists()


def test_an_unregistered_task_is_refused_with_the_registered_ones(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", task="margin-classify")
    one_line(cli("finetune", f), "`task` in r.yaml must be one of classify, mae, masked-tokens, genie")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Task,), {"name": "classify"}))
