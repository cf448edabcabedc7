"""2-process DDP with gloo on CPU: both ranks end with identical weights (and they did change)."""

import os
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, write_recipe

from moe_cli.recipe import load_recipe
from moe_cli.train.build import build_model
from moe_cli.train.loop import train


def _worker(rank: int, world: int, port: int, recipe_path: str, dump: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(load_recipe(recipe_path), device="cpu")
    state = {k: v.contiguous() for k, v in result.ckpt.model.state_dict().items()}
    safetensors.torch.save_file(state, f"{dump}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.long
def test_two_rank_gloo_weights_identical(tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", model={"upcycle": {"experts": 4, "k": 2}},
                     train={"steps": 4, "batch_size": 8})
    mp.spawn(_worker, args=(2, free_port(), f, str(tmp_path)), nprocs=2, join=True)
    r0 = safetensors.torch.load_file(str(tmp_path / "rank0.safetensors"))
    r1 = safetensors.torch.load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = safetensors.torch.load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
    torch.manual_seed(0)
    start = build_model(load_recipe(f)).model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.router.weight", "blocks.1.mlp.experts.w1"):
        assert not torch.equal(start[key], r0[key]), f"{key} did not train"


@pytest.mark.long
def test_aux_free_biases_stay_identical_on_both_ranks(tmp_path):
    """Each rank routes its own batches; the loads are summed over the ranks before the bias update."""
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", model={"upcycle": {
        "experts": 4, "k": 1, "balance": "aux_free", "bias_update": 0.05}}, moe={"load_balance": 0.0},
        train={"steps": 4, "batch_size": 8})
    mp.spawn(_worker, args=(2, free_port(), f, str(tmp_path)), nprocs=2, join=True)
    r0 = safetensors.torch.load_file(str(tmp_path / "rank0.safetensors"))
    r1 = safetensors.torch.load_file(str(tmp_path / "rank1.safetensors"))
    bias = [k for k in r0 if k.endswith("router.expert_bias")]
    assert len(bias) == 2 and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(r0[k].abs().max() > 0 for k in bias)  # the biases moved


@pytest.mark.long
@pytest.mark.parametrize("override", ["train.parallel=bogus", "train.expert_parallel=0"])
def test_a_recipe_error_under_torchrun_is_printed_once(tmp_path, override):
    """Every rank reads the same recipe before the processes join their group: rank 0 says what is wrong, once
    (before: once per rank). torchrun turns the exit code 2 into its own 1."""
    import shutil
    import subprocess

    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "moe_cli", "finetune", f, "--set",
                        override], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "MOE_DEVICE": "cpu"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and override.split("=")[0] in errors[0], r.stderr
    assert not (tmp_path / "out").exists()
