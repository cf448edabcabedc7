"""Under `train.parallel: fsdp` the model is built without its weights, upcycled as a structure, sharded, and each
rank reads only its shards from the source's files (experts made from the dense FFN by the upcycling rule, layer
by layer, each layer proved to reproduce its FFN): the run equals the one-process run that built the whole
model — for a moe-cli checkpoint (exact copies, proved layer by layer) and a transformers Llama folder (noisy
copies: the random draws match), also with expert parallelism (each rank fills only its experts' rows)."""

import json
import os

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, seed_hub_cache, write_recipe

from moe_cli.recipe import load_recipe
from moe_cli.train.loop import Reporter, train
from moe_cli.train.meta_build import plan_meta_build

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}



class Messages(Reporter):
    def __init__(self, path):
        self.path = path

    def message(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text + "\n")


def _worker(rank: int, world: int, port: int, recipes: list[str], log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for f in recipes:
            train(load_recipe(f), device="cpu", reporter=Messages(log))
    finally:
        dist.destroy_process_group()


def _losses(run) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def _sources(tmp_path) -> dict[str, dict]:
    """name -> recipe sections: a dense moe-cli checkpoint (a ViT trained 2 steps) and a transformers Llama folder."""
    dense = write_recipe(tmp_path / "dense.yaml", tmp_path / "dense", train={"steps": 2, "batch_size": 8})
    train(load_recipe(dense), device="cpu")
    out = {"vit": {"model": {"source": str(tmp_path / "dense" / "final"), "pretrained": True,
                             "kwargs": {}, "upcycle": {"experts": 4, "k": 2}}}}  # exact copies: proved per layer
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "llama")
    out["llama"] = {"model": {"source": str(tmp_path / "llama"), "kwargs": {},
                              "upcycle": {"experts": 4, "k": 2, "noise_std": 0.01}},
                    "data": {"name": "lm-synthetic"}, "task": "causal-lm", "causal_lm": {"eval_max_batches": 2}}
    return out


def test_a_hub_repository_builds_on_meta_too(tmp_path, monkeypatch):
    """An `hf-hub:` source (a transformers LM repository, here from a seeded cache, offline) is read in slices
    from its snapshot's safetensors, and records its repository as the base model; without pretrained weights
    (its architecture alone) it is built whole."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "llama")
    seed_hub_cache(tmp_path / "hub", "org/tiny-llama", tmp_path / "llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sections = {"model": {"source": "hf-hub:org/tiny-llama", "pretrained": True, "kwargs": {},
                          "upcycle": {"experts": 4, "k": 2}}, "data": {"name": "lm-synthetic"}, "task": "causal-lm"}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"parallel": "fsdp"}, **sections))
    build = plan_meta_build(recipe, recipe.make_task())
    assert build is not None and build.weights.where and build.ckpt.extra["base_model"] == "org/tiny-llama"
    assert all(p.device.type == "meta" for p in build.ckpt.model.parameters())
    sections["model"]["pretrained"] = False
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"parallel": "fsdp"}, **sections))
    assert plan_meta_build(recipe, recipe.make_task()) is None


@pytest.mark.long
def test_fsdp_builds_on_meta_and_matches_one_process(tmp_path):
    recipes = {}
    for name, sections in _sources(tmp_path).items():
        for run, world, layout in ((1, 1, {}), (2, 2, {"parallel": "fsdp"}),
                                   ("ep", 2, {"parallel": "fsdp", "expert_parallel": 2})):  # each rank its experts
            train_cfg = {"steps": 3, "batch_size": 8 // world, "log_every": 1, "seed": 3, **layout}
            recipes[(name, run)] = write_recipe(tmp_path / f"{name}{run}.yaml", tmp_path / f"{name}_w{run}",
                                                moe={"load_balance": 0.01}, train=train_cfg, **sections)
        assert plan_meta_build(load_recipe(recipes[(name, 2)]), load_recipe(recipes[(name, 2)]).make_task())
    for name in ("vit", "llama"):
        train(load_recipe(recipes[(name, 1)]), device="cpu")
    log = tmp_path / "messages.txt"
    mp.spawn(_worker, args=(2, free_port(), [recipes[(n, r)] for n in ("vit", "llama") for r in (2, "ep")], str(log)),
             nprocs=2, join=True)
    said = log.read_text()
    assert said.count("built on the meta device and sharded") == 4, said
    assert said.count("verify: 2 upcycled layers each reproduce their dense FFN") == 2, said  # the exact copies
    for name, run in (("vit", 2), ("llama", 2), ("vit", "ep"), ("llama", "ep")):
        want, got = _losses(tmp_path / f"{name}_w1"), _losses(tmp_path / f"{name}_w{run}")
        assert sorted(got) == sorted(want) == [1, 2, 3]
        for step, loss in want.items():
            assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (name, run, step, got[step], loss)
        a = safetensors.torch.load_file(str(tmp_path / f"{name}_w1" / "final" / "model.safetensors"))
        b = safetensors.torch.load_file(str(tmp_path / f"{name}_w{run}" / "final" / "model.safetensors"))
        assert a.keys() == b.keys()
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=key, n=name, r=run: f"{n} {r} {k}: {m}")
