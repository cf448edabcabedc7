"""FSDP2, expert parallelism and both, on 2 and 4 gloo processes, against one process with the same global batch.

Every layout (and fsdp + EP under torch.compile) reaches the one-process losses at every step and its final
weights (fp32), with the load-balance loss on: its f_i is counted over the global batch (all processes, one
all-reduce), so it is the one-process loss; counted per process (`moe.load_balance_scope: micro_batch`) it is
not, and that run is shown to differ. Activation checkpointing under fsdp + EP changes nothing. A run stopped on 4
processes
(fsdp, 4-way EP) resumes on 2 (fsdp, 2-way EP) and continues the uninterrupted run. The final checkpoint is one
whole file every command reads."""

import json
import os

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, write_recipe

from moe_cli.io.checkpoint import INDEX_NAME, read_tensors, weights_path
from moe_cli.recipe import load_recipe
from moe_cli.train.loop import Reporter, train

GLOBAL_BATCH, STEPS = 8, 4
LAYOUTS = {"fsdp": {"parallel": "fsdp"}, "ep2": {"expert_parallel": 2},
           "fsdp_ep2": {"parallel": "fsdp", "expert_parallel": 2}}



def _recipe(tmp, name: str, world: int, scope: str = "global", **train) -> str:
    return write_recipe(tmp / f"{name}.yaml", tmp / name, model={"upcycle": {"experts": 4, "k": 2}},
                        moe={"load_balance": 0.1, "z_loss": 0.001, "load_balance_scope": scope},
                        train={"steps": STEPS, "batch_size": GLOBAL_BATCH // world, "log_every": 1, **train})


class _Stop(Exception):
    pass


class _StopAfter(Reporter):
    def __init__(self, step: int):
        self.step = step

    def log(self, record: dict) -> None:
        if record["step"] > self.step:
            raise _Stop


def _recipes(tmp, world: int) -> list[str]:
    """This world size's runs (written before the processes start): the layouts, then the stopped (4) or resumed
    (2) run."""
    runs = [_recipe(tmp, f"{name}_w{world}", world, **layout) for name, layout in LAYOUTS.items()]
    if world == 2:
        runs.append(_recipe(tmp, "compiled_w2", world, compile=True, compile_backend="aot_eager",
                            **LAYOUTS["fsdp_ep2"]))
        runs.append(_recipe(tmp, "per_process_w2", world, scope="micro_batch"))
        runs.append(_recipe(tmp, "recomputed_w2", world, activation_checkpointing="blocks", **LAYOUTS["fsdp_ep2"]))
    # the resumed run's last/ and final/ above max_shard_size: Hugging Face's shards, each file written by one rank
    return runs + [_recipe(tmp, "resumed", world, parallel="fsdp", expert_parallel=world, ckpt_every=2,
                           max_shard_size="60KB")]


def _worker(rank: int, world: int, port: int, recipes: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for f in recipes[:-1]:
            train(load_recipe(f), device="cpu")
        if world == 4:  # stopped after its checkpoint at step 2 ...
            try:
                train(load_recipe(recipes[-1]), device="cpu", reporter=_StopAfter(2))
            except _Stop:
                pass
        else:  # ... and continued here, on 2 processes
            train(load_recipe(recipes[-1]), device="cpu", resume=True)
    finally:
        dist.destroy_process_group()


def _one_torchrun_process(rank: int, port: int, recipe: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_RUN_ID="test")
    torch.set_num_threads(1)
    try:
        result = train(load_recipe(recipe), device="cpu")
        from torch.distributed.tensor import DTensor

        assert dist.is_initialized() and result.final is not None
        assert not isinstance(next(result.ckpt.model.parameters()), DTensor)  # the caller gets the whole model
    finally:
        dist.destroy_process_group()


def _losses(run) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


@pytest.mark.long
def test_sharded_layouts_match_one_process(tmp_path):
    one = train(load_recipe(_recipe(tmp_path, "one", 1)), device="cpu")
    want_losses = _losses(one.out_dir)
    want = safetensors.torch.load_file(str(one.final))
    assert sorted(want_losses) == list(range(1, STEPS + 1))
    for world in (4, 2):
        mp.spawn(_worker, args=(world, free_port(), _recipes(tmp_path, world)), nprocs=world, join=True)
    # one torchrun process joins a group of one and shards over it (the one-GPU NCCL smoke test's path)
    mp.spawn(_one_torchrun_process, args=(free_port(), _recipe(tmp_path, "fsdp_w1", 1, parallel="fsdp")), nprocs=1)
    # the load-balance loss counted on each process's own tokens is another loss: the check can tell
    per_process = _losses(tmp_path / "per_process_w2")
    assert max(abs(per_process[s] - want_losses[s]) for s in want_losses) > 1e-4, (per_process, want_losses)
    runs = [f"{name}_w{world}" for world in (2, 4) for name in LAYOUTS] + ["fsdp_w1", "compiled_w2", "recomputed_w2",
                                                                          "resumed"]
    for run in runs:
        losses = _losses(tmp_path / run)
        assert sorted(losses) == sorted(want_losses), run
        for step, loss in want_losses.items():
            assert abs(losses[step] - loss) <= 1e-5 * max(1.0, abs(loss)), f"{run} step {step}: {losses[step]} " \
                                                                            f"vs one process {loss}"
        got = read_tensors(weights_path(tmp_path / run / "final"))  # one file or shards
        assert got.keys() == want.keys(), run
        for key, value in want.items():
            assert got[key].shape == value.shape, f"{run} {key}"
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=key, r=run: f"{r} {k}: {m}")
    # the resumed run's last checkpoint was written by 2 processes with 2-way EP, its weights sharded as final/
    for folder in ("last", "final"):
        index = json.loads((tmp_path / "resumed" / folder / INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) >= 4, index["weight_map"]
        assert not (tmp_path / "resumed" / folder / "model.safetensors").exists()
    state = torch.load(tmp_path / "resumed" / "last" / "train_state.pt", weights_only=True)
    assert state["world"] == 2 and state["recipe"]["train"]["expert_parallel"] == 2 and state["step"] == STEPS


def _densify_worker(rank: int, world: int, port: int, recipe: str) -> None:
    from moe_cli.train.stages import densify_to_sparse

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        densify_to_sparse(load_recipe(recipe), device="cpu")
    finally:
        dist.destroy_process_group()


@pytest.mark.long
def test_densify_stages_run_sharded_and_stage2_trains_only_the_gates(tmp_path):
    f = write_recipe(tmp_path / "d.yaml", tmp_path / "d2s", train={"batch_size": 8, "parallel": "fsdp",
                                                                  "expert_parallel": 2},
                     densify={"experts": 4, "k": 1, "stage1": {"steps": 2}, "stage2": {"steps": 2, "lr": 1e-2},
                              "stage3": {"steps": 2}})
    mp.spawn(_densify_worker, args=(2, free_port(), f), nprocs=2, join=True)
    s1, s2 = (safetensors.torch.load_file(str(tmp_path / "d2s" / f"stage{i}" / "final" / "model.safetensors"))
              for i in (1, 2))
    gates = [k for k in s2 if k.endswith("router.weight")]
    assert gates and all(not torch.equal(s1[k], s2[k]) for k in gates)  # the new gates trained
    assert all(torch.equal(s1[k], s2[k]) for k in s2 if k not in gates)  # everything else stayed frozen
    assert (tmp_path / "d2s" / "stage3" / "final" / "model.safetensors").is_file()


def _densify_recipe(tmp, name: str, world: int, **train) -> str:
    """Densify with the batch-statistic losses off (per-token CV, per-expert CV, load balance: each rank's batch has
    its own statistics), so that every layout must give the one-process result."""
    return write_recipe(tmp / f"{name}.yaml", tmp / name, moe={"load_balance": 0.0, "z_loss": 0.001},
                        train={"batch_size": GLOBAL_BATCH // world, "log_every": 1, **train},
                        densify={"experts": 4, "k": 2, "stage1": {"steps": 2, "token_cv": 0.0, "expert_cv": 0.0},
                                 "stage2": {"steps": 2, "lr": 1e-2, "task": 0.5}, "stage3": {"steps": 2}})


@pytest.mark.long
def test_densify_under_expert_parallel_matches_one_process(tmp_path):
    """ddp + 2-way EP ran stage 1 and then died in stage 2 (the distillation KL was looked up under DDP's
    `module.` names and found nothing); now all three stages run and equal the one-process run."""
    from moe_cli.train.stages import densify_to_sparse

    densify_to_sparse(load_recipe(_densify_recipe(tmp_path, "one", 1)), device="cpu")
    f = _densify_recipe(tmp_path, "ep2", 2, expert_parallel=2)
    mp.spawn(_densify_worker, args=(2, free_port(), f), nprocs=2, join=True)
    for stage in ("stage1", "stage2", "stage3"):
        want, got = _losses(tmp_path / "one" / stage), _losses(tmp_path / "ep2" / stage)
        assert sorted(got) == sorted(want) == [1, 2], stage
        for step, loss in want.items():
            assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), f"{stage} step {step}: {got[step]} vs {loss}"
    want = safetensors.torch.load_file(str(tmp_path / "one" / "stage3" / "final" / "model.safetensors"))
    got = safetensors.torch.load_file(str(tmp_path / "ep2" / "stage3" / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_layouts_the_job_cannot_take_are_refused(tmp_path, cli):
    from moe_cli.errors import ConfigError
    from moe_cli.runtime import Dist
    from moe_cli.train.parallel import plan

    recipe = load_recipe(_recipe(tmp_path, "r", 1, expert_parallel=2))
    with pytest.raises(ConfigError, match=r"train.expert_parallel: 2 must divide the number of processes \(3\)"):
        plan(recipe, Dist(rank=0, world=3), torch.device("cpu"))
    f = _recipe(tmp_path, "fp16", 1)
    r = cli("finetune", f, "--set", "train.precision=fp16", "--set", "train.parallel=fsdp")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "fp16 loss scaling is not supported with " \
        "sharded training" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_keeps_the_global_batch(tmp_path, cli):
    f = _recipe(tmp_path, "run", 1, steps=2)
    assert cli("finetune", f).exit_code == 0
    r = cli("finetune", f, "--resume", "--set", "train.steps=3", "--set", "train.batch_size=4")
    assert r.exit_code == 2 and "the global batch (train.batch_size x processes) must stay 8 x 1 = 8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _lm_recipe(tmp, name: str, world: int, **train) -> str:
    import yaml

    data = {"model": {"source": "transformers:LlamaForCausalLM", "pretrained": False, "kwargs": LLAMA,
                      "upcycle": {"experts": 4, "k": 2}},
            "data": {"name": "lm-synthetic"}, "task": "causal-lm", "optim": {"lr": 3e-3},
            "moe": {"load_balance": 0.1, "z_loss": 0.001}, "causal_lm": {"eval_max_batches": 1},
            "train": {"steps": STEPS, "batch_size": GLOBAL_BATCH // world, "log_every": 1, **train},
            "output": str(tmp / name)}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return str(tmp / f"{name}.yaml")


def _lm_worker(rank: int, world: int, port: int, recipes: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for f in recipes:
            train(load_recipe(f), device="cpu")
    finally:
        dist.destroy_process_group()


@pytest.mark.long
def test_an_upcycled_llama_trains_sharded_as_on_one_process(tmp_path):
    """A transformers Llama, upcycled, under ddp + EP and fsdp + EP on 2 processes: the one-process losses."""
    pytest.importorskip("transformers")
    one = train(load_recipe(_lm_recipe(tmp_path, "one", 1)), device="cpu")
    want = _losses(one.out_dir)
    runs = {"ep2": {"expert_parallel": 2}, "fsdp_ep2": {"parallel": "fsdp", "expert_parallel": 2}}
    mp.spawn(_lm_worker, args=(2, free_port(), [_lm_recipe(tmp_path, n, 2, **t) for n, t in runs.items()]),
             nprocs=2, join=True)
    for name in runs:
        got = _losses(tmp_path / name)
        assert sorted(got) == sorted(want), name
        for step, loss in want.items():
            assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), f"{name} step {step}: {got[step]} vs {loss}"
