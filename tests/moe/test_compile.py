"""torch.compile: the MoE layer traces without graph breaks, and changing token counts do not recompile each
step; recipes can ask for it (`train.compile`). The aot_eager backend keeps these tests fast (no codegen)."""

import pytest
import torch
from conftest import write_recipe
from timm.layers import Mlp

from moe_cli.moe import MoEMlp, RoutingRecorder


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_layer_compiles_fullgraph_with_recorder_and_dynamic_tokens():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = MoEMlp.from_dense(Mlp(16, 32), 4, 2, capacity_factor=1.5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    counters.clear()
    rec = RoutingRecorder(layer, aux=True)
    for tokens in (8, 12, 16, 20, 28):
        x = torch.randn(tokens, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), rec:
            y = compiled(x)
            aux, _ = rec.aux_loss(0.01, 0.001)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = layer(x)
        torch.testing.assert_close(y.float(), want.float(), rtol=0.02, atol=0.02)
        (y.float().sum() + aux).backward()
        assert x.grad is not None and torch.isfinite(aux)
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one dynamic graph for all others


def test_recipe_compile_trains(tmp_path):
    from moe_cli.config import load_recipe
    from moe_cli.train.loop import train

    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"steps": 3, "batch_size": 16, "log_every": 1,
                                                                   "compile": True, "compile_backend": "aot_eager"},
                     model={"upcycle": {"experts": 2, "k": 1}})
    res = train(load_recipe(f), device="cpu")
    assert res.step == 3 and all(h["loss"] == h["loss"] for h in res.history if h["split"] == "train")
