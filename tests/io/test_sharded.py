"""Hugging Face's sharded safetensors layout (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`,
the moe-cli metadata in the index): `moe export --max-shard-size` and a run's `final/` above
`train.max_shard_size` write it, and every command reads it (eval, inspect, merge, prune, push, finetune from it,
`hf-hub:` through the cache); a native transformers export shards as transformers does and loads there."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_line, seed_hub_cache, write_recipe
from tolerance import assert_close_scaled

from moe_cli.io.checkpoint import INDEX_NAME, load_checkpoint, shard_files

MOE = {"upcycle": {"experts": 4, "k": 2}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from typer.testing import CliRunner

    from moe_cli.cli.app import app

    tmp = tmp_path_factory.mktemp("sharded")
    f = write_recipe(tmp / "r.yaml", tmp / "run", model=MOE,
                     train={"steps": 2, "batch_size": 16, "max_shard_size": "300KB"})
    r = CliRunner().invoke(app, ["finetune", f], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return tmp / "run"


@pytest.mark.long
def test_a_large_final_is_sharded_and_every_command_reads_it(run, cli, tmp_path):
    final = run / "final"
    index = json.loads((final / INDEX_NAME).read_text())
    shards = sorted(p.name for p in final.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (final / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["format"] == "moe-cli/1"
    assert all(p.stat().st_size <= 300_000 + 200_000 for p in final.glob("model-*.safetensors"))  # one tensor may
    ckpt = load_checkpoint(final)  # exceed the limit alone; none holds much more
    x = torch.randn(2, 3, 32, 32)
    whole = load_checkpoint(run / "last")  # the same weights, one file
    with torch.no_grad():
        assert_close_scaled(ckpt.model(x), whole.model(x))
    r = json.loads(cli("eval", str(final), "--metric", "accuracy", "--json").stdout)
    assert 0 <= r["accuracy"]["top1"] <= 1
    assert cli("inspect", str(final), "--out", str(tmp_path / "insp"), "--images", "1").exit_code == 0
    assert cli("prune", str(final), "--keep", "2", "-o", str(tmp_path / "pruned")).exit_code == 0
    assert cli("merge", str(final), "--experts", "1", "-o", str(tmp_path / "merged")).exit_code == 0
    # pushed as it is, and read back through the Hub cache offline
    assert cli("push", str(final), "me/sharded", "--dry-run", str(tmp_path / "dry")).exit_code == 0
    assert {INDEX_NAME, *shards} <= {p.name for p in (tmp_path / "dry").iterdir()}
    seed_hub_cache(tmp_path / "hub", "me/sharded", tmp_path / "dry")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MOE_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-m", "moe_cli", "eval", "hf-hub:me/sharded", "--metric", "accuracy",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["accuracy"]["top1"] == r["accuracy"]["top1"], out.stderr


def test_export_shards_on_request_and_refuses_a_bad_size(run, cli, tmp_path):
    r = cli("export", str(run / "final"), "--out", str(tmp_path / "exp"), "--max-shard-size", "200KB",
            "--dtype", "bf16")
    assert r.exit_code == 0 and "shards)" in r.output, r.output
    files = shard_files(tmp_path / "exp" / INDEX_NAME)
    assert len(files) >= 2 and all(f.is_file() for f in files)
    assert load_checkpoint(tmp_path / "exp").moe.experts == 4
    # exported again without sharding into the same folder: the old shards go
    assert cli("export", str(run / "final"), "--out", str(tmp_path / "one.safetensors")).exit_code == 0
    one_line(cli("export", str(run / "final"), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"),
             "--max-shard-size must be a size such as 5GB")
    one_line(cli("export", str(run / "final"), "--out", str(tmp_path / "y.safetensors"), "--max-shard-size", "1MB"),
             "sharded weights are written into a folder")


def test_a_sharded_native_export_loads_in_transformers(cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    assert cli("upcycle", str(tmp_path / "dense"), "--experts", "4", "--k", "2", "-o", str(tmp_path / "moe")
               ).exit_code == 0
    r = cli("export", str(tmp_path / "moe"), "--format", "transformers", "--out", str(tmp_path / "native"),
            "--max-shard-size", "100KB")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "native" / INDEX_NAME).is_file()
    native = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "native"))
    assert type(native).__name__ == "MixtralForCausalLM"
