"""The shared loop: training works, exact resume after SIGKILL, NaN stop, ImageFolder data through timm."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import write_recipe
from PIL import Image

import moe_cli
from moe_cli.recipe import load_recipe
from moe_cli.train.loop import Reporter, train


def weights(path):
    return safetensors.torch.load_file(str(path / "final" / "model.safetensors"))


def test_upcycled_training_logs_and_learns(tmp_path, cli):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", model={"upcycle": {"experts": 4, "k": 2}},
                     train={"steps": 40, "eval_every": 20})
    r = cli("finetune", f)
    assert r.exit_code == 0, r.output
    assert "final: step 40" in r.output
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [x for x in recs if x["split"] == "train"]
    assert {"loss", "lr", "speed", "unit", "load_balance", "z_loss", "expert_imbalance"} <= set(train_recs[0])
    first, final = train_recs[:4], train_recs[-4:]
    assert sum(x["loss"] for x in final) < sum(x["loss"] for x in first) * 0.9
    assert [x["step"] for x in recs if x["split"] == "val"] == [20, 40]
    model = moe_cli.load(tmp_path / "out" / "final")
    assert sum(type(m).__name__ == "MoEMlp" for m in model.modules()) == 2


def test_existing_run_needs_resume_or_overwrite(tmp_path, cli):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"steps": 2})
    assert cli("finetune", f).exit_code == 0
    r = cli("finetune", f)
    assert r.exit_code == 2 and "--resume" in r.stderr
    assert cli("finetune", f, "--overwrite").exit_code == 0


@pytest.mark.long
def test_kill_and_resume_is_exact(tmp_path):
    steps = {"steps": 24, "ckpt_every": 4, "log_every": 1}
    model = {"upcycle": {"experts": 4, "k": 2}, "kwargs": {**_tiny_kwargs(), "drop_rate": 0.1}}
    ref = write_recipe(tmp_path / "ref.yaml", tmp_path / "ref", train=steps, model=model)
    assert subprocess.run([sys.executable, "-m", "moe_cli", "-q", "finetune", ref]).returncode == 0

    run = write_recipe(tmp_path / "run.yaml", tmp_path / "run", train=steps, model=model)
    proc = subprocess.Popen([sys.executable, "-m", "moe_cli", "-q", "finetune", run])
    state = tmp_path / "run" / "last" / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run" / "final").exists()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert killed_at < 24
    r = subprocess.run([sys.executable, "-m", "moe_cli", "finetune", run, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tiny_kwargs():
    from conftest import TINY_RECIPE

    return dict(TINY_RECIPE["model"]["kwargs"])


def test_nan_loss_stops_with_message(tmp_path, cli):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", optim={"name": "sgd", "lr": 100},
                     train={"steps": 20, "ckpt_every": 1, "clip": None})
    r = cli("finetune", f)
    assert r.exit_code == 1
    assert "loss became" in r.stderr and "last good checkpoint" in r.stderr
    assert (tmp_path / "out" / "last" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "final").exists()


def test_imagefolder_through_timm(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("circle", "square"):
            d = tmp_path / "data" / split / label
            d.mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data={"name": "", "root": str(tmp_path / "data")},
                     model={"kwargs": {**_tiny_kwargs(), "num_classes": 2}}, train={"steps": 3, "batch_size": 4})
    result = train(load_recipe(f), device="cpu")
    assert result.step == 3 and (tmp_path / "out" / "final" / "model.safetensors").exists()
    # the loop's final accuracy is the published model's, measured again by `moe eval` on the same split
    from typer.testing import CliRunner

    from moe_cli.cli.app import app

    r = CliRunner().invoke(app, ["eval", str(tmp_path / "out" / "final"), "--data", str(tmp_path / "data"),
                                 "--metric", "accuracy", "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)["accuracy"]["top1"]
    assert result.eval["accuracy"] == pytest.approx(again, abs=1e-6) and again * 12 == pytest.approx(round(again * 12))


def test_bad_data_root_is_one_line(tmp_path, cli):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data={"name": "", "root": str(tmp_path / "none")})
    r = cli("finetune", f)
    assert r.exit_code == 2 and "cannot open dataset" in r.stderr


def test_a_run_written_by_0_2_resumes_exactly(tmp_path):
    """0.2.0 kept the optimizer state inside train_state.pt (no last/optimizer/, no `world`)."""
    import shutil

    from moe_cli.io.checkpoint import load_checkpoint
    from moe_cli.runtime import Dist
    from moe_cli.train.optim import make_optimizer
    from moe_cli.train.parallel import Parallelism

    sections = {"model": {"upcycle": {"experts": 4, "k": 2}}}
    whole = write_recipe(tmp_path / "whole.yaml", tmp_path / "whole", **sections, train={"steps": 4})
    cut = write_recipe(tmp_path / "cut.yaml", tmp_path / "cut", **sections, train={"steps": 4, "ckpt_every": 2})
    train(load_recipe(whole), device="cpu")

    class Stop(Exception):
        pass

    class StopAfter2(Reporter):
        def log(self, record):
            if record["step"] > 2:
                raise Stop

    with pytest.raises(Stop):
        train(load_recipe(cut), device="cpu", reporter=StopAfter2())
    last = tmp_path / "cut" / "last"
    model = load_checkpoint(last).model
    optimizer = make_optimizer(load_recipe(cut), model)
    Parallelism(Dist()).load_optimizer(last / "optimizer", model, optimizer)
    state = torch.load(last / "train_state.pt", weights_only=True)
    state["optimizer"] = optimizer.state_dict()
    del state["world"]
    torch.save(state, last / "train_state.pt")
    shutil.rmtree(last / "optimizer")  # now laid out as 0.2.0 wrote it

    train(load_recipe(cut), device="cpu", resume=True)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
