"""Prune and merge go through the layer (its one owner), and what they write loads again: uneven expert counts
per layer, split experts, and the checks that refuse what cannot be done."""

import json

import pytest
import safetensors.torch
import timm
import torch
from conftest import model_args
from timm.layers import Mlp
from tolerance import assert_close_scaled

from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import load_checkpoint, read_metadata
from moe_cli.models.reduce import merge_layer
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.recorder import RoutingRecorder
from moe_cli.moe.upcycling import from_dense

VIT = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]


def eval_json(cli, ckpt) -> dict:
    r = cli("eval", str(ckpt), "--data", "digits", "--metric", "accuracy,routing", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_select_experts_shrinks_router_and_experts_together():
    torch.manual_seed(0)
    layer = from_dense(Mlp(8, 16), 4, 2, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    layer.reconfigure(disabled=(3,))
    router, w1 = layer.router.weight.detach().clone(), layer.experts.w1.detach().clone()
    layer.select_experts([2, 0, 3])
    assert layer.cfg.experts == layer.num_experts == layer.experts.num_experts == 3 and layer.cfg.disabled == ()
    assert torch.equal(layer.router.weight, router[[2, 0, 3]]) and torch.equal(layer.experts.w1, w1[[2, 0, 3]])
    assert layer.router.cfg is layer.cfg
    with RoutingRecorder(layer) as rec:
        layer(torch.randn(5, 8))
    assert rec.records[""].counts.shape == (3,) and int(rec.records[""].counts.sum()) == 10
    for keep, needle in (([0], "fewer than k=2"), ([0, 0], "distinct"), ([0, 7], "between 0 and 2")):
        with pytest.raises(ConfigError, match=needle):
            layer.select_experts(keep)
    assert layer.num_experts == 3  # refused changes leave the layer as it was


def test_uneven_prune_round_trips_through_eval_and_inspect(cli, tmp_path):
    """Before: `moe prune --drop-experts 0:1` wrote a checkpoint that eval and inspect could not load."""
    assert cli("upcycle", *VIT, "--experts", "4", "--k", "2", "--out", str(tmp_path / "m")).exit_code == 0
    r = cli("prune", str(tmp_path / "m"), "--drop-experts", "0:1", "-o", str(tmp_path / "p"))
    assert r.exit_code == 0, r.output
    layout = json.loads(read_metadata(tmp_path / "p" / "model.safetensors")["moe"])
    assert layout["layer_experts"] == [3, 4] and layout["layer_hidden"] == [768, 768]
    ck = load_checkpoint(tmp_path / "p")
    assert [m.num_experts for _, m in moe_layers(ck.model)] == [3, 4]
    # the pruned layer is the original without expert 1
    full = load_checkpoint(tmp_path / "m").model
    a, b = dict(moe_layers(full))["blocks.0.mlp"], dict(moe_layers(ck.model))["blocks.0.mlp"]
    assert torch.equal(b.experts.w1, a.experts.w1[[0, 2, 3]])
    assert torch.equal(b.router.weight, a.router.weight[[0, 2, 3]])
    out = eval_json(cli, tmp_path / "p")
    assert [len(v["load"]) for v in out["routing"].values()] == [3, 4]
    r = cli("inspect", str(tmp_path / "p"), "--data", "digits", "--out", str(tmp_path / "insp"), "--images", "2")
    assert r.exit_code == 0, r.output


def test_merge_to_different_counts_per_layer_round_trips(cli, tmp_path):
    assert cli("upcycle", *VIT, "--experts", "4", "--k", "1", "--noise-std", "0.01",
               "--out", str(tmp_path / "m")).exit_code == 0
    ck = load_checkpoint(tmp_path / "m")
    x = torch.randn(6, 3, 32, 32)
    from moe_cli.models.reduce import expert_usage

    usage = expert_usage(ck.model, [x])
    for (name, layer), n in zip(moe_layers(ck.model), (2, 3), strict=True):
        merge_layer(layer, usage[name], n, name)
    from moe_cli.io.checkpoint import save

    save(ck, tmp_path / "merged")
    again = load_checkpoint(tmp_path / "merged")
    assert [m.num_experts for _, m in moe_layers(again.model)] == [2, 3]
    assert_close_scaled(again.model(x), ck.model.eval()(x))
    assert [len(v["load"]) for v in eval_json(cli, tmp_path / "merged")["routing"].values()] == [2, 3]


def test_split_checkpoints_prune_and_merge_back_to_the_dense_ffn(cli, tmp_path):
    """Before: prune/merge of split experts wrote unloadable checkpoints, merge --experts 1 crashed."""
    assert cli("upcycle", *VIT, "--experts", "4", "--k", "2", "--init", "split",
               "--out", str(tmp_path / "s")).exit_code == 0
    r = cli("prune", str(tmp_path / "s"), "--keep", "2", "--calib", "digits", "-o", str(tmp_path / "p"))
    assert r.exit_code == 0, r.output
    pruned = load_checkpoint(tmp_path / "p")
    assert {m.experts.w1.shape for _, m in moe_layers(pruned.model)} == {(2, 192, 192)}  # slices of 768 / 4
    eval_json(cli, tmp_path / "p")
    r = cli("merge", str(tmp_path / "s"), "--experts", "2", "--calib", "digits", "-o", str(tmp_path / "m2"))
    assert r.exit_code == 2 and "split experts" in r.stderr and not (tmp_path / "m2").exists()
    r = cli("merge", str(tmp_path / "s"), "--experts", "1", "--calib", "digits", "-o", str(tmp_path / "dense"))
    assert r.exit_code == 0, r.output
    name, kw = "vit_tiny_patch16_224", {"depth": 2, "img_size": 32, "num_classes": 10}
    bare = timm.create_model(name, **kw).eval()
    bare.load_state_dict(safetensors.torch.load_file(str(tmp_path / "dense" / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    import moe_cli

    assert_close_scaled(bare(x), moe_cli.load(tmp_path / "s", top_k=4)(x))  # all slices routed: the dense model


def test_prune_refuses_an_empty_drop_list(cli, tmp_path):
    assert cli("upcycle", *VIT, "--experts", "2", "--k", "1", "--out", str(tmp_path / "m")).exit_code == 0
    r = cli("prune", str(tmp_path / "m"), "--drop-experts", "", "-o", str(tmp_path / "p"))
    assert r.exit_code == 2 and "empty list" in r.stderr and not (tmp_path / "p").exists()
