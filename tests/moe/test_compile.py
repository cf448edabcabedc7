"""torch.compile: the MoE layer traces without graph breaks, and changing token counts do not recompile each
step; recipes can ask for it (`train.compile`). The aot_eager backend keeps these tests fast (no codegen)."""

import pytest
import torch
from conftest import write_recipe
from timm.layers import Mlp

from moe_cli.moe import RoutingRecorder
from moe_cli.moe.upcycling import from_dense


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_layer_compiles_fullgraph_with_recorder_and_dynamic_tokens():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = from_dense(Mlp(16, 32), 4, 2, capacity_factor=1.5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    counters.clear()
    with RoutingRecorder(layer, aux=True) as rec:  # the loop enters its recorder once, around all steps
        for tokens in (8, 12, 16, 20, 28):
            x = torch.randn(tokens, 16, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = compiled(x)
                aux, _ = rec.aux_loss(0.01, 0.001)
                assert int(rec.records[""].counts.sum()) <= 2 * tokens
                want = layer(x)
            torch.testing.assert_close(y.float(), want.float(), rtol=0.02, atol=0.02)
            (y.float().sum() + aux).backward()
            assert x.grad is not None and torch.isfinite(aux)
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one dynamic graph for all others


def test_fp32_layer_compiles_fullgraph():
    """Before: fp32 ran the loop path, which reads group sizes on the host (a graph break)."""
    torch.manual_seed(0)
    layer = from_dense(Mlp(32, 64), 4, 2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for tokens in (10, 24):
        x = torch.randn(tokens, 32, requires_grad=True)
        y = compiled(x)
        want = layer(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad((y * g).sum(), x)
        (wx,) = torch.autograd.grad((want * g).sum(), x)
        torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)


def test_recipe_compile_trains_like_eager(tmp_path):
    """train.compile changes how the step runs, not what it computes: the same losses as the eager run."""
    from moe_cli.recipe import load_recipe
    from moe_cli.train.loop import train

    losses = {}
    for compiled in (False, True):
        f = write_recipe(tmp_path / f"r{compiled}.yaml", tmp_path / f"out{compiled}",
                         train={"steps": 3, "batch_size": 16, "log_every": 1, "compile": compiled,
                                "compile_backend": "aot_eager"}, model={"upcycle": {"experts": 2, "k": 1}})
        res = train(load_recipe(f), device="cpu")
        losses[compiled] = [h["loss"] for h in res.history if h["split"] == "train"]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
