"""Upcycling real timm families (Mlp, SwiGLU, GluMlp, conv Mlp) preserves outputs; save/load round trips."""

import copy

import pytest
import torch
from conftest import TINY, tiny_model
from timm.layers import GluMlp, Mlp, SwiGLU

import moe_cli
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, load_checkpoint, save
from moe_cli.models.flops import param_counts
from moe_cli.models.probe import probe_batch
from moe_cli.models.surgery import find_ffns, moe_layers, select_layers, upcycle
from moe_cli.models.upcycle import max_output_diff
from moe_cli.moe.layer import MoEMlp

FFN_OF = {"vit": Mlp, "eva_swiglu": SwiGLU, "eva_glu": GluMlp, "convnext": Mlp}


@pytest.mark.parametrize("family", list(FFN_OF))
@pytest.mark.parametrize("gate", ["topk", "soft"])
def test_upcycle_preserves_outputs(family, gate):
    dense = tiny_model(family)
    assert {type(m) for _, m in find_ffns(dense)} == {FFN_OF[family]}
    sparse, cfg = upcycle(copy.deepcopy(dense), experts=4, k=2, gate=gate)
    assert len(moe_layers(sparse)) == len(find_ffns(dense)) == len(cfg.layers)
    x = probe_batch(dense)
    diff, scale = max_output_diff(dense, sparse, x)
    assert scale > 0.1  # outputs are not trivially zero
    assert diff < 1e-5 * max(1, scale)


def test_noise_breaks_equality_and_layers_subset():
    dense = tiny_model("vit")
    sparse, cfg = upcycle(copy.deepcopy(dense), experts=4, k=2, layers="1", noise_std=0.05)
    assert cfg.layers == ("blocks.1.mlp",)
    assert isinstance(sparse.blocks[1].mlp, MoEMlp) and isinstance(sparse.blocks[0].mlp, Mlp)
    diff, _ = max_output_diff(dense, sparse, probe_batch(dense))
    assert diff > 1e-3


@pytest.mark.parametrize("spec,expected", [("all", [0, 1, 2, 3, 4, 5]), ("every-2", [1, 3, 5]),
                                           ("every-3", [2, 5]), ("last-2", [4, 5]), ("0,3,5", [0, 3, 5])])
def test_select_layers(spec, expected):
    assert select_layers(6, spec) == expected


@pytest.mark.parametrize("spec", ["last-9", "0,7", "every-0", "some"])
def test_select_layers_errors(spec):
    with pytest.raises(ConfigError):
        select_layers(6, spec)


def test_target_glob_matching_non_ffn_is_rejected():
    with pytest.raises(ConfigError, match="blocks.0.norm1"):
        upcycle(tiny_model("vit"), experts=2, k=1, target="blocks.0.*")


def test_target_glob_exact():
    dense = tiny_model("vit")
    with pytest.raises(ConfigError, match="not an FFN"):
        upcycle(copy.deepcopy(dense), target="blocks.*.attn")
    sparse, cfg = upcycle(copy.deepcopy(dense), experts=2, k=1, target="blocks.0.mlp")
    assert cfg.layers == ("blocks.0.mlp",)


@pytest.mark.parametrize("family", ["vit", "eva_swiglu"])
def test_save_load_round_trip_bit_exact(tmp_path, family):
    dense = tiny_model(family)
    sparse, cfg = upcycle(copy.deepcopy(dense), experts=3, k=2)
    name, kwargs = TINY[family]
    save(Checkpoint(sparse, {"name": name, "kwargs": kwargs}, source=name), tmp_path / "ck")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["model.safetensors"]  # no temp file left
    loaded = moe_cli.load(tmp_path / "ck")
    x = probe_batch(dense)
    assert torch.equal(loaded(x), sparse.eval()(x))
    assert param_counts(loaded) == param_counts(sparse)
    assert load_checkpoint(tmp_path / "ck" / "model.safetensors").moe == cfg
