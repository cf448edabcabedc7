"""Long runs: plain log lines when the output is a file, one progress display under torchrun, Ctrl-C while a
checkpoint is written is one line (exit 130) with the previous checkpoint intact, per-layer routing in the
loggers' scalars, `train.keep_best` and `train.keep_last`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import one_line, write_recipe
from tolerance import assert_close_scaled

from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.recipe import load_recipe
from moe_cli.train.loggers import scalars
from moe_cli.train.loop import train

MOE = {"upcycle": {"experts": 4, "k": 2}}


def test_plain_lines_at_log_steps_when_not_a_terminal(tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model=MOE, train={"steps": 6, "log_every": 2})
    r = cli("finetune", recipe)  # CliRunner's stdout is not a terminal, as a redirected log file is not
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.startswith("classify step ")]
    assert [line.split()[2] for line in steps] == ["2/6", "4/6", "6/6"], r.stdout
    assert all(" img/s" in line and " lr " in line and " load " in line and " ETA " in line for line in steps)
    assert any(line.startswith("classify done: 6 steps") and " took " in line for line in lines)
    assert "━" not in r.stdout  # no bar drawn into a file


@pytest.mark.long
def test_one_progress_display_under_torchrun(tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", model=MOE, train={"steps": 4, "log_every": 2})
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "moe_cli", "finetune", f],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "MOE_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("classify step 2/4") == 1, r.stdout  # rank 0's only (before: once per rank)
    assert r.stdout.count("load: tokens of the busiest expert") == 1
    assert r.stdout.count("classify final:") == 1


def test_ctrl_c_while_a_checkpoint_is_written_is_one_line_and_keeps_the_previous_one(tmp_path, cli, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model=MOE,
                          train={"steps": 6, "ckpt_every": 2, "log_every": 2})
    calls = {"n": 0}
    real = filesystem.FileSystemWriter.write_data

    def interrupted_second_time(self, plan, planner):  # the user presses Ctrl-C while step 4's checkpoint is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", interrupted_second_time)
    one_line(cli("finetune", recipe), "interrupted", code=130)
    assert calls["n"] == 2
    state = torch.load(tmp_path / "run" / "last" / "train_state.pt", weights_only=False)
    assert state["step"] == 2  # the previous checkpoint, whole
    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", real)
    assert cli("finetune", recipe, "--resume").exit_code == 0
    resumed = load_checkpoint(tmp_path / "run" / "final").model.state_dict()
    straight = train(load_recipe(write_recipe(tmp_path / "s.yaml", tmp_path / "straight", model=MOE,
                                              train={"steps": 6, "ckpt_every": 2, "log_every": 2})),
                     device="cpu").ckpt.model.state_dict()
    for key, value in straight.items():
        assert_close_scaled(resumed[key], value)


def test_keep_best_and_keep_last(tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model=MOE,
                          train={"steps": 8, "eval_every": 2, "ckpt_every": 2, "keep_best": "ce", "keep_last": 2})
    assert cli("finetune", recipe).exit_code == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "val"]
    best = json.loads((run / "best" / "best.json").read_text())
    low = min(evals, key=lambda r: r["ce"])
    assert best == {"metric": "ce", "value": low["ce"], "step": low["step"]}
    r = json.loads(cli("eval", str(run / "best"), "--metric", "ce", "--json").stdout)
    assert r["ce"] == pytest.approx(best["value"], rel=1e-4)  # best/ is that model
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    assert torch.load(run / "checkpoints" / "step-0000004" / "train_state.pt", weights_only=False)["step"] == 4


def test_bad_log_and_keep_settings_are_one_line(tmp_path, cli):
    for train_cfg, needle in (({"keep_best": "speed"}, "`train.keep_best` in r.yaml must be a validation metric of "
                                                       "task `classify` (accuracy, top5, ce)"),
                              ({"keep_last": 0}, "`train.keep_last` in r.yaml must be an integer >= 1"),
                              ({"log_to": ["mlflow"]}, "`train.log_to` in r.yaml must be a list of tensorboard, wandb"),
                              ({"log_to": ["wandb"]}, "`train.log_to` wandb needs the optional `wandb` package")):
        if "wandb" in str(train_cfg) and __import__("importlib").util.find_spec("wandb") is not None:
            continue  # installed: it would log
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train=train_cfg)
        one_line(cli("finetune", recipe), needle)
        assert not (tmp_path / "run" / "final").exists()


def test_training_records_carry_per_layer_routing_to_the_loggers(tmp_path):
    res = train(load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", model=MOE,
                                         train={"steps": 2, "log_every": 1})), device="cpu")
    rec = next(r for r in res.history if r["split"] == "train")
    values = scalars(rec)
    layer = next(iter(rec["routing"]))
    assert {f"routing/{layer}/max_load", f"routing/{layer}/dropped", f"routing/{layer}/entropy",
            f"routing/{layer}/expert_3", "train/loss", "train/speed"} <= set(values)
    assert values[f"routing/{layer}/max_load"] >= 1.0 and "train/unit" not in values
