"""FFN layouts are adapters (moe_cli.moe.ffn): each reads a dense FFN into expert weights and writes them back,
and upcycling, split, merge-to-dense and router calibration run through them. The gate/up/down MLP (what
Llama, Mistral, Qwen2 and Qwen3 use) is one adapter: a model built from it upcycles exactly, with no other code."""

import copy

import pytest
import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from tolerance import assert_close_scaled
from torch import nn

from moe_cli.models.calibrate import capture_inputs
from moe_cli.models.reduce import densify, expert_usage, merge
from moe_cli.models.surgery import find_ffns, upcycle
from moe_cli.moe.ffn import LAYOUTS, GateUpDownLayout, layout_of, read_ffn, write_ffn
from moe_cli.moe.layer import moe_layers


class GateUpDownMLP(nn.Module):
    """The MLP of transformers' Llama / Mistral / Qwen2 / Qwen3 (LlamaMLP), written out: no bias, SiLU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.mlp = GateUpDownMLP(dim, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as small LMs are

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


class FcActivationMLP(nn.Module):
    """The MLP of transformers' ViT / DINOv2 / CLIP / SigLIP (ViTMLP, CLIPMLP), written out."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.GELU("tanh")

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


def tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder().eval()


@pytest.mark.parametrize("module", [Mlp(8, 16), GluMlp(8, 16), GluMlp(8, 16, gate_last=False), SwiGLU(8, 16),
                                    Mlp(8, 16, norm_layer=nn.LayerNorm), GateUpDownMLP(8, 16), FcActivationMLP(8, 16)],
                         ids=["mlp", "glu", "glu-gate-first", "swiglu", "mlp-norm", "gate-up-down", "fc-activation"])
def test_each_layout_writes_back_what_it_read(module):
    torch.manual_seed(1)
    for p in module.parameters():
        nn.init.normal_(p)
    dense = read_ffn(module)
    other = copy.deepcopy(module)
    for p in other.parameters():
        nn.init.zeros_(p)
    write_ffn(other, {k: v.clone() for k, v in dense.weights.items()})
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), module(x), rtol=0, atol=0)  # a copy: bit-exact


def test_gate_up_down_is_found_and_upcycles_exactly():
    model = tiny_decoder()
    assert [n for n, _ in find_ffns(model)] == ["layers.0.mlp", "layers.1.mlp"]
    assert isinstance(layout_of(model.layers[0].mlp), GateUpDownLayout)
    ids = torch.randint(0, 50, (2, 7))
    want = model(ids)
    for fields in ({"experts": 4, "k": 2}, {"experts": 4, "k": 2, "shared_experts": 1, "shared_gate": True},
                   {"experts": 4, "k": 4, "init": "split"}):
        sparse, layout = upcycle(copy.deepcopy(model), **fields)
        assert len(moe_layers(sparse)) == 2 and sparse.lm_head.weight is sparse.embed_tokens.weight
        assert moe_layers(sparse)[0][1].experts.glu
        assert_close_scaled(sparse(ids), want, torch.float32)


def test_gate_up_down_merges_back_to_the_dense_model_and_calibrates():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (4, 7))
    sparse, _ = upcycle(copy.deepcopy(model), experts=4, k=4, init="split")
    merge(sparse, 1, lambda m: expert_usage(m, [ids]))
    dense = densify(sparse, TinyDecoder())
    assert_close_scaled(dense.eval()(ids), model(ids), torch.float32)
    seen = capture_inputs(model, ("layers.0.mlp",), [ids])
    assert seen["layers.0.mlp"].shape == (4 * 7, 32)


def test_a_layout_is_one_adapter_in_one_list():
    assert [type(lay).__name__ for lay in LAYOUTS] == ["SwiGLULayout", "GluLayout", "GateUpDownLayout", "Conv1DLayout",
                                                       "FcActivationLayout", "FcLayout"]
    with pytest.raises(ValueError, match="not an FFN of a known layout"):
        read_ffn(nn.Linear(2, 2))
