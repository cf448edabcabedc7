"""`train.activation_checkpointing: blocks | moe` recomputes activations in the backward pass: losses, gradients
and the routing statistics (counted once per forward, not again when a block is recomputed) are those of a run
without it, and parameter names are unchanged."""

import copy

import pytest
import torch
from conftest import write_recipe
from tolerance import assert_close_scaled

from moe_cli.moe.recorder import RoutingRecorder
from moe_cli.recipe import load_recipe
from moe_cli.train.loop import train
from moe_cli.train.parallel import checkpoint_activations


def run(tmp_path, name, mode):
    recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name,
                          model={"upcycle": {"experts": 4, "k": 2, "balance": "aux_free"}},
                          moe={"load_balance": 0.1, "z_loss": 0.001},
                          train={"steps": 4, "grad_accum": 2, "batch_size": 16, "log_every": 1,
                                 "activation_checkpointing": mode})
    return train(load_recipe(recipe), device="cpu")


def test_recomputing_changes_nothing_but_memory(tmp_path):
    plain = run(tmp_path, "none", "none")
    want = plain.ckpt.model.state_dict()
    losses = [r["loss"] for r in plain.history if r["split"] == "train"]
    for mode in ("blocks", "moe"):
        other = run(tmp_path, mode, mode)
        assert [r["loss"] for r in other.history if r["split"] == "train"] == pytest.approx(losses, rel=1e-5)
        got = other.ckpt.model.state_dict()
        assert got.keys() == want.keys()  # names unchanged: checkpoints and FSDP see the same model
        for key, value in want.items():  # aux-free biases included: the recompute does not count tokens twice
            assert_close_scaled(got[key], value, ulps=4096)


def test_gradients_are_those_without_checkpointing():
    import timm

    from moe_cli.models.surgery import upcycle

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10, drop_rate=0.1,
                              proj_drop_rate=0.1)
    base, _ = upcycle(dense, experts=4, k=2)
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for mode in ("none", "blocks", "moe"):
        model = copy.deepcopy(base).train()
        assert checkpoint_activations(model, mode) == {"none": 0, "blocks": 2, "moe": 2}[mode]
        torch.manual_seed(1)  # dropout: the recompute replays the RNG
        with RoutingRecorder(model, aux=True) as rec:
            loss = model(x).square().mean() + sum(r.load_balance for r in rec)
            loss.backward()
            counts = {n: c.clone() for n, c in rec.take_counts().items()}
        grads[mode] = ({n: p.grad.clone() for n, p in model.named_parameters()}, counts)
    for mode in ("blocks", "moe"):
        for name, g in grads["none"][0].items():
            assert_close_scaled(grads[mode][0][name], g, ulps=256)
        for name, c in grads["none"][1].items():
            assert torch.equal(grads[mode][1][name], c), (mode, name)  # counted once per forward
