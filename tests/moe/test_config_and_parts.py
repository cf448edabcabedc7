"""One config, owned by the layer: Router / Dispatcher / Experts, timm `mlp_layer`, reconfigure, no-decay names."""

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import Mlp
from tolerance import assert_close_scaled

from moe_cli.checks import labelled
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.moe import DISPATCHERS, ExpertChoiceRouter, MoEConfig, MoEMlp, RoutingRecorder, SoftRouter, TopKRouter
from moe_cli.moe.config import MoELayout, UpcycleCfg, flag
from moe_cli.moe.upcycling import from_dense
from moe_cli.recipe import Recipe, recipe_from_dict
from moe_cli.train.optim import make_optimizer, no_weight_decay_names

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_checkpoint_written_by_v010_loads_with_same_outputs():
    ck = load_checkpoint(FIXTURES / "vit-moe-v0.1.0.safetensors")
    io = torch.load(FIXTURES / "vit-moe-v0.1.0-io.pt", weights_only=True)
    assert ck.moe.layers == ("blocks.0.mlp", "blocks.1.mlp")
    assert (ck.moe.capacity_factor, ck.moe.priority, ck.moe.experts, ck.moe.k) == (2.0, "score", 4, 2)
    assert_close_scaled(ck.model(io["x"]), io["y"])  # fp32, kernels of another torch version


def test_timm_builds_an_moe_vit_through_mlp_layer():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3,
                              mlp_layer=partial(MoEMlp, num_experts=4, k=2, capacity_factor=1.5))
    layers = [m for m in model.modules() if isinstance(m, MoEMlp)]
    assert len(layers) == 2 and layers[0].cfg == MoEConfig(experts=4, k=2, capacity_factor=1.5)
    assert layers[0].experts.w1.shape == (4, 192 * 4, 192)
    # each expert is initialised like the nn.Linear it stands for (fan-in = in_features, not H * D)
    bound = 1 / 192 ** 0.5
    assert layers[0].experts.w1.abs().max() <= bound and layers[0].experts.w1.abs().max() > 0.9 * bound
    x = torch.randn(2, 3, 32, 32)
    with RoutingRecorder(model, aux=True) as rec:
        out = model(x)
    assert out.shape == (2, 3) and len(rec.records) == 2
    loss, _ = rec.aux_loss(0.01, 0.001)
    (out.sum() + loss).backward()
    assert layers[0].router.weight.grad.abs().sum() > 0


def test_timm_keywords_scalar_or_pair_conv_and_norm():
    m = MoEMlp(8, 16, act_layer=torch.nn.ReLU, bias=(True, False), drop=(0.1, 0.0), use_conv=True,
               norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), num_experts=2, k=1, dtype=torch.float64)
    assert m.experts.b2 is None and m.experts.b1 is not None and m.experts.drop == (0.1, 0.0)
    assert m.experts.norm_eps == 1e-5 and m.experts.w1.dtype == torch.float64
    assert isinstance(m.experts.act, torch.nn.ReLU)
    assert m(torch.randn(2, 8, 3, 3, dtype=torch.float64)).shape == (2, 8, 3, 3)


def test_router_class_follows_gate_and_reconfigure_keeps_the_weight():
    layer = from_dense(Mlp(8, 16), 4, 2)
    assert isinstance(layer.router, TopKRouter)
    weight = layer.router.weight
    layer.reconfigure(gate="soft")
    assert isinstance(layer.router, SoftRouter) and layer.router.weight is weight
    layer.reconfigure(gate="expert_choice", capacity_factor=2.0)
    assert isinstance(layer.router, ExpertChoiceRouter) and layer.cfg.capacity_factor == 2.0
    with pytest.raises(ConfigError, match="k must be between 1 and experts"):
        layer.reconfigure(gate="topk", k=5)
    assert isinstance(layer.router, ExpertChoiceRouter)  # a refused change leaves the layer as it was


def test_dispatchers_are_objects_with_three_steps():
    layer = from_dense(Mlp(8, 16), 4, 2)
    x = torch.randn(10, 8)
    routing = layer.router(x)
    outs = []
    for impl in ("loop", "grouped"):
        disp = DISPATCHERS[impl]
        x_rows, plan = disp.dispatch(x, routing.expert, layer.experts)
        y = disp.combine(layer.experts(x_rows, plan), plan, routing.weight)
        outs.append(y)
        assert plan.counts[1:].sum() == 20
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], layer(x), rtol=0, atol=0)


def test_a_recorder_listens_only_inside_with_and_leaves_no_state_on_the_layer():
    layer = from_dense(Mlp(8, 16), 4, 2)
    rec = RoutingRecorder(layer, aux=True, gates=True)
    with rec:
        layer(torch.randn(5, 8))
    seen = rec.records[""]
    assert int(seen.counts.sum()) == 10 and seen.load_balance is not None and seen.gate.shape == (5, 1, 4)
    layer(torch.randn(7, 8))  # outside: not recorded
    assert rec.records[""] is seen
    assert not layer._forward_pre_hooks and not layer.router._forward_hooks  # hooks removed on leaving
    assert set(vars(layer)) == set(vars(from_dense(Mlp(8, 16), 4, 2)))  # nothing added to the layer


def test_stacked_biases_and_norms_are_not_decayed():
    """Before: only names ending .b1/.b2/.bg were exempt, so the (E, H) norm_w / norm_b were decayed."""
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, scale_mlp=True)
    from moe_cli.models.surgery import upcycle

    upcycle(model, experts=2, k=1)
    names = no_weight_decay_names(model)
    assert {"blocks.0.mlp.experts.norm_w", "blocks.0.mlp.experts.norm_b", "blocks.0.mlp.experts.b1"} <= names
    assert "pos_embed" in names and "cls_token" in names  # the model's own timm no_weight_decay()
    opt = make_optimizer(Recipe(), model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    by_name = dict(model.named_parameters())
    for name in ("blocks.0.mlp.experts.norm_w", "blocks.0.mlp.experts.norm_b", "pos_embed"):
        assert id(by_name[name]) not in decayed, name
    assert id(by_name["blocks.0.mlp.experts.w1"]) in decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(by_name)


@pytest.mark.parametrize("fields,needle", [
    ({"experts": 0}, "experts` in r.yaml must be at least 1"),
    ({"experts": 2, "k": 3}, "`model.upcycle.k` in r.yaml must be between 1"),
    ({"capacity_factor": float("nan")}, "`model.upcycle.capacity_factor` in r.yaml must be a finite number"),
    ({"noise_std": -1.0}, "`model.upcycle.noise_std` in r.yaml"),
])
def test_one_validation_speaks_each_callers_language(fields, needle):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"model": {"upcycle": fields}, "train": {"steps": 1}}, "r.yaml")
    assert needle in str(e.value)
    with pytest.raises(ConfigError, match="^--"), labelled(flag):
        UpcycleCfg(**fields)
    with pytest.raises(ConfigError, match="^[a-z_]+ must"):  # the library's words: the argument name
        UpcycleCfg(**fields)


@pytest.mark.parametrize("moe,needle", [
    ({"experts": 2, "k": 3, "layers": ["blocks.0.mlp"]}, "metadata `moe.k` must be between 1"),
    ({"experts": 2, "k": 1, "gate": "nope", "layers": ["blocks.0.mlp"]}, "metadata `moe.gate` must be one of"),
    ({"experts": 2, "k": 1, "layers": ["blocks.9.mlp"]}, "MoE layer `blocks.9.mlp` does not exist"),
    ([1, 2], "metadata `moe` must be a mapping"),
])
def test_inconsistent_checkpoint_metadata_is_one_line(tmp_path, moe, needle):
    import json

    import safetensors.torch

    from moe_cli.io.checkpoint import read_metadata, read_tensors

    src = FIXTURES / "vit-moe-v0.1.0.safetensors"
    meta = {**read_metadata(src), "moe": json.dumps(moe)}
    safetensors.torch.save_file(read_tensors(src), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(tmp_path / "bad.safetensors")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layout_round_trips_and_ignores_unknown_keys():
    layout = MoELayout(experts=3, k=1, layers=("a.mlp",))
    assert MoELayout.from_dict({**layout.to_dict(), "noise_std": 0.3, "future": 1}) == layout
