"""Beyond weight copying: split (exact at k = E), drop (the share of re-initialised units), data-driven routers,
top-p gates, and expert pruning and merging (merge to one expert of a copy-upcycled model is the dense model)."""

import math

import pytest
import safetensors.torch
import timm
import torch
from conftest import model_args
from timm.layers import Mlp, SwiGLU
from tolerance import assert_close_scaled

from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, load_checkpoint, save
from moe_cli.models.surgery import upcycled_copy
from moe_cli.moe import RoutingRecorder
from moe_cli.moe.config import UpcycleCfg
from moe_cli.moe.ffn import read_ffn
from moe_cli.moe.routing import top_p
from moe_cli.moe.upcycling import expert_weights, from_dense

VIT = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]


@pytest.mark.parametrize("dense", [Mlp(16, 32), SwiGLU(16, 32)], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("split", ["cluster", "random"])
def test_split_at_k_equal_e_is_the_dense_ffn(dense, split):
    torch.manual_seed(0)
    moe = from_dense(dense, 4, 4, init="split", split=split).eval()
    assert moe.cfg.combine == "sum" and moe.experts.w1.shape == (4, 8, 16)
    x = torch.randn(2, 5, 16)
    assert_close_scaled(moe(x), dense.eval()(x))
    half = from_dense(dense, 4, 2, init="split", split=split).eval()
    with RoutingRecorder(half) as rec:
        half(x)
    assert rec.records[""].counts.sum() == 2 * 10  # k/E of the FFN's work per token


def test_drop_reinitialises_the_asked_share_of_units_per_expert():
    torch.manual_seed(0)
    dense = Mlp(16, 40)
    w = expert_weights(read_ffn(dense), 4, "drop", drop_ratio=0.5, generator=torch.Generator().manual_seed(1))
    changed = [set(torch.nonzero((w["w1"][e] != dense.fc1.weight).any(-1)).flatten().tolist()) for e in range(4)]
    assert all(len(c) == 20 for c in changed)  # round(0.5 * 40) rows of fc1 per expert
    cols = [set(torch.nonzero((w["w2"][e] != dense.fc2.weight).any(0)).flatten().tolist()) for e in range(4)]
    assert cols == changed and len(set(map(frozenset, changed))) == 4  # fc2 columns follow; experts differ
    assert torch.equal(w["b2"][0], dense.fc2.bias)
    with pytest.raises(ConfigError, match=r"drop_ratio must be in \[0, 1\)"):  # checked once, in the config
        UpcycleCfg(init="drop", drop_ratio=1.0)


def test_split_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    kw = {"depth": 2, "img_size": 32, "num_classes": 10}
    model, layout = upcycled_copy(timm.create_model("vit_tiny_patch16_224", **kw), experts=4, k=2, init="split")
    assert layout.init == "split" and layout.combine == "sum"
    ck = load_checkpoint(save(Checkpoint(model, {"name": "vit_tiny_patch16_224", "kwargs": kw}), tmp_path / "s"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ck.model(x), model.eval()(x))


def test_kmeans_router_balances_the_initial_load():
    from moe_cli.data.loaders import calibration_batches
    from moe_cli.io.sources import load_source
    from moe_cli.models.upcycle import upcycle_verified
    from moe_cli.moe.config import UpcycleCfg

    loads = {}
    for method in ("random", "kmeans"):
        torch.manual_seed(0)
        ck = load_source("vit_tiny_patch16_224", pretrained=False, model_kwargs={"depth": 2, "img_size": 32,
                                                                                 "patch_size": 8})
        batches = calibration_batches(ck.model, "digits", 2)
        cfg = UpcycleCfg(experts=8, k=2, init="split", router_init=method,
                         calib="digits" if method != "random" else None)
        upcycle_verified(ck.model, cfg, calibration=batches)
        with RoutingRecorder(ck.model) as rec:
            ck.model.eval()(batches[0])
        loads[method] = max(float(r.counts.max() / r.counts.float().mean()) for r in rec)
    assert loads["kmeans"] < loads["random"], loads


def test_top_p_routes_to_the_fewest_experts_reaching_p():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.3, 0.3, 0.3, 0.1], [0.5, 0.5, 0.0, 0.0]]) + 1e-9)
    r = top_p(logits, 0.6, k=3)
    assert (r.expert >= 0).sum(-1).tolist() == [1, 2, 2]  # 0.7 >= .6; .3+.3; .5+.5
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(3))
    layer = from_dense(Mlp(8, 16), 4, 2, gate="top_p", top_p=0.99).eval()
    with RoutingRecorder(layer) as rec:
        layer(torch.randn(50, 8))
    assert 50 <= rec.records[""].counts.sum() <= 100


def test_merge_to_one_expert_is_the_dense_model_and_loads_in_bare_timm(cli, tmp_path):
    assert cli("upcycle", *VIT, "--out", str(tmp_path / "moe")).exit_code == 0
    r = cli("merge", str(tmp_path / "moe"), "--experts", "1", "--calib", "digits", "--out", str(tmp_path / "dense"))
    assert r.exit_code == 0, r.output
    name, kw = "vit_tiny_patch16_224", {"depth": 2, "img_size": 32, "num_classes": 10}
    bare = timm.create_model(name, **kw).eval()
    bare.load_state_dict(safetensors.torch.load_file(str(tmp_path / "dense" / "model.safetensors")))
    moe = load_checkpoint(tmp_path / "moe").model
    x = torch.randn(2, 3, 32, 32)
    assert_close_scaled(bare(x), moe(x))
    assert cli("merge", str(tmp_path / "moe"), "--experts", "2", "--calib", "digits",
               "--out", str(tmp_path / "two")).exit_code == 0
    two = load_checkpoint(tmp_path / "two")
    assert two.moe.experts == 2 and two.model(x).shape == (2, 10)


def test_prune_shrinks_and_keep_all_is_the_identity(cli, tmp_path):
    assert cli("upcycle", *VIT, "--experts", "4", "--k", "1", "--out", str(tmp_path / "m")).exit_code == 0
    assert cli("prune", str(tmp_path / "m"), "--keep", "4", "--calib", "digits",
               "--out", str(tmp_path / "all")).exit_code == 0
    assert cli("prune", str(tmp_path / "m"), "--keep", "2", "--calib", "digits",
               "--out", str(tmp_path / "two")).exit_code == 0
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("m", "all", "two")}
    assert size["two"] < size["m"] and math.isclose(size["all"], size["m"], rel_tol=0.01)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_checkpoint(tmp_path / "all").model(x), load_checkpoint(tmp_path / "m").model(x))
    two = load_checkpoint(tmp_path / "two")
    assert two.moe.experts == 2 and two.model.blocks[0].mlp.experts.w1.shape[0] == 2
    assert cli("prune", str(tmp_path / "m"), "--drop-experts", "0:1,1:3", "--out", str(tmp_path / "d")).exit_code == 0
    assert [m.num_experts for m in (load_checkpoint(tmp_path / "d").model.blocks[i].mlp for i in (0, 1))] == [3, 3]


@pytest.mark.parametrize("args,needle", [
    (["upcycle", *VIT, "--init", "drop", "--drop-ratio", "1.5"], "--drop-ratio must be in [0, 1)"),
    (["upcycle", *VIT, "--router-init", "kmeans"], "--calib"),
    (["upcycle", *VIT, "--router-init", "activation", "--calib", "digits"], "needs --init split"),
    (["upcycle", *VIT, "--init", "split", "--experts", "5"], "multiple of --experts"),
])
def test_init_errors_are_one_line(cli, tmp_path, args, needle):
    r = cli(*args, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def test_reduce_errors_are_one_line(cli, tmp_path):
    assert cli("upcycle", *VIT, "--out", str(tmp_path / "m")).exit_code == 0
    for args, needle in ((["merge", "--experts", "9"], "between 1 and 4"),
                         (["prune", "--keep", "9"], "between 1 and 4"),
                         (["prune", "--drop-experts", "7:0"], "layer 7 does not exist"),
                         (["prune", "--keep", "1"], "fewer than k=2")):
        r = cli(args[0], str(tmp_path / "m"), *args[1:], "--calib", "digits", "--out", str(tmp_path / "o"))
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (args, r.output)
        assert not (tmp_path / "o").exists()


def test_split_verification_reports_the_error_at_k(cli, tmp_path):
    r = cli("upcycle", *VIT, "--init", "split", "--experts", "4", "--k", "2", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0 and "differs, as expected (split, k=2 < 4 experts)" in r.output
    r = cli("upcycle", *VIT, "--init", "split", "--experts", "4", "--k", "4", "--out", str(tmp_path / "p"))
    assert r.exit_code == 0 and "ok" in r.output
