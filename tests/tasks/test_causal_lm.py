"""`task: causal-lm`: a tiny transformers Llama trained from scratch on the built-in lm-synthetic set lowers its
next-token loss, upcycles and keeps training, and `moe eval` reports CE, perplexity and accuracy per token;
lm-tokens folders of fixed-length sequences; every bad combination is one line."""

import json
import math

import numpy as np
import pytest
import yaml
from conftest import one_line

pytest.importorskip("transformers")

from moe_cli.data.lm import synthetic_sequences  # noqa: E402
from moe_cli.data.tokens import write_tokens  # noqa: E402
from moe_cli.recipe import load_recipe  # noqa: E402
from moe_cli.train.loop import train  # noqa: E402

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def lm_recipe(tmp_path, name="dense", steps=120, model=None, **sections):
    data = {"model": model or {"source": "transformers:LlamaForCausalLM", "pretrained": False, "kwargs": LLAMA},
            "data": {"name": "lm-synthetic"}, "task": "causal-lm", "optim": {"lr": 1e-2, "weight_decay": 0.0},
            "train": {"steps": steps, "batch_size": 32, "log_every": 10, "seed": 0},
            "causal_lm": {"eval_max_batches": 4}, "output": str(tmp_path / name), **sections}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / f"{name}.yaml")


def test_synthetic_source_has_structure_to_learn():
    x = synthetic_sequences(4, length=32, seed=0)
    assert x.shape == (4, 32) and x.min() >= 0 and x.max() < 64
    assert np.array_equal(x, synthetic_sequences(4, length=32, seed=0))  # deterministic


def test_a_tiny_llama_learns_then_upcycles_and_keeps_learning(tmp_path, cli):
    dense = train(load_recipe(lm_recipe(tmp_path)), device="cpu")
    losses = [r["loss"] for r in dense.history if r.get("split") == "train"]
    assert losses[-1] < losses[0] - 0.3 and dense.eval["ce"] < math.log(64) - 0.2  # below the uniform guess
    assert dense.eval["perplexity"] == pytest.approx(math.exp(dense.eval["ce"]), rel=1e-6)
    up = train(load_recipe(lm_recipe(tmp_path, "moe", steps=10, model={
        "source": str(tmp_path / "dense" / "final"), "upcycle": {"experts": 4, "k": 2}}, optim={"lr": 1e-3})),
        device="cpu")
    assert up.ckpt.moe.experts == 4 and up.eval["ce"] < dense.eval["ce"] + 0.05
    r = cli("eval", str(tmp_path / "moe" / "final"), "--metric", "ce,perplexity,accuracy,flops,throughput")
    assert r.exit_code == 0, r.output
    for label in ("next-token cross-entropy", "perplexity", "next-token accuracy", "GFLOPs / token", "tokens/s",
                  "moe eval (lm-synthetic)"):
        assert label in r.output, r.output
    out = json.loads(cli("eval", str(tmp_path / "moe" / "final"), "--json", "--metric", "ce,flops").stdout)
    assert out["ce"] == pytest.approx(up.eval["ce"], rel=0.05)  # all validation batches, not only 4
    assert out["flops"]["gflops_per_token"] < out["flops"]["gflops_per_image"]


def test_a_token_folder_of_sequences_trains(tmp_path):
    for split, seed in (("train", 0), ("validation", 1)):
        write_tokens(tmp_path / "toks", split, synthetic_sequences(64, length=24, seed=seed), vocab_size=64)
    r = train(load_recipe(lm_recipe(tmp_path, steps=2, data={"name": "lm-tokens", "root": str(tmp_path / "toks")})),
              device="cpu")
    assert math.isfinite(r.eval["ce"])


@pytest.mark.parametrize("sections,needle", [
    ({"data": {"name": "lm-tokens"}}, "`data.root` in dense.yaml is required for `data.name: lm-tokens`"),
    ({"data": {"name": "digits"}}, "task `causal-lm` trains on token sequences"),
    ({"task": "classify"}, "task `causal-lm` trains on token sequences (`data.name: lm-synthetic`"),
    ({"causal_lm": {"eval_max_batches": 0}}, "`causal_lm.eval_max_batches` in dense.yaml must be"),
])
def test_bad_causal_lm_recipes_are_one_line(tmp_path, cli, sections, needle):
    one_line(cli("finetune", lm_recipe(tmp_path, **sections)), needle)
    assert not (tmp_path / "dense").exists()


def test_a_vision_model_is_not_a_language_model(tmp_path, cli):
    f = lm_recipe(tmp_path, model={"source": "vit_tiny_patch16_224", "pretrained": False,
                                   "kwargs": {"img_size": 32, "depth": 1}})
    one_line(cli("finetune", f), "task causal-lm trains transformers causal LMs")
    f = lm_recipe(tmp_path, model={"source": "transformers:LlamaForCausalLM", "pretrained": True, "kwargs": LLAMA})
    one_line(cli("finetune", f), "names an architecture, not weights: set `pretrained: false`")


def test_densify_to_sparse_runs_on_a_language_model(tmp_path, cli):
    recipe = lm_recipe(tmp_path, "d2s", densify={"experts": 4, "k": 1, "layers": "all", "stage1": {"steps": 3},
                                                 "stage2": {"steps": 3, "lr": 1e-2}, "stage3": {"steps": 3}})
    r = cli("densify-to-sparse", recipe)
    assert r.exit_code == 0, r.output
    assert "GFLOPs per token" in r.output and "layers.0.mlp" in r.output and "lm.model.layers" not in r.output
    report = json.loads((tmp_path / "d2s" / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["dense", "distill", "finetune"]
    assert all(s["unit"] == "token" and "perplexity" in s for s in stages.values())
    # the sparse gates run 1 of 4 experts per token: fewer FLOPs per token than the dense MoE's 4
    assert stages["distill"]["gflops_per_token"] < stages["dense"]["gflops_per_token"]
    rows = [json.loads(line) for line in (tmp_path / "d2s" / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert {row.get("unit") for row in rows if row.get("split") == "train"} == {"token"}
