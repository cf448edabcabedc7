"""Dense-to-sparse stages on a tiny model: stage 2 changes only the gates, and the sparse gate learns the
dense gate's choices."""

import json

import safetensors.torch
import torch
from conftest import write_recipe

import moe_cli
from moe_cli.data.digits import digits
from moe_cli.models.surgery import moe_layers
from moe_cli.recipe import load_recipe
from moe_cli.train.stages import densify_to_sparse

DENSIFY = {"experts": 4, "k": 1,
           "stage1": {"steps": 8, "lr": 1e-3, "token_cv": 0.01, "expert_cv": 0.01},
           "stage2": {"steps": 80, "lr": 2e-2, "distill": 1.0, "task": 0.0},
           "stage3": {"steps": 2}}


def run(tmp_path, cli=None):
    f = write_recipe(tmp_path / "d.yaml", tmp_path / "d2s", densify=DENSIFY, train={"batch_size": 32})
    return f, densify_to_sparse(load_recipe(f), device="cpu")


def state(path):
    return safetensors.torch.load_file(str(path / "final" / "model.safetensors"))


def test_stages_gate_only_change_agreement_and_report(tmp_path):
    f, report = run(tmp_path)
    out = tmp_path / "d2s"
    s1, s2 = state(out / "stage1"), state(out / "stage2")
    assert s1.keys() == s2.keys()
    gates = [k for k in s1 if k.endswith("router.weight")]
    assert len(gates) == 2
    for k in s1:
        if k in gates:
            assert not torch.equal(s1[k], s2[k]), f"{k} should be a new, trained gate"
        else:
            assert torch.equal(s1[k], s2[k]), f"{k} changed during stage 2"
    assert report["stages"]["distill"]["trainable_params"] == sum(s1[k].numel() for k in gates)

    # top-1 of the distilled sparse gate vs argmax of the dense gate, on the same tokens
    dense, sparse = moe_cli.load(out / "stage1" / "final"), moe_cli.load(out / "stage2" / "final")
    tokens = {}
    for name, layer in moe_layers(sparse):
        layer.register_forward_hook(lambda m, inp, _out, name=name: tokens.__setitem__(name, inp[0]))
    sparse(digits("val").images[:64])
    agree = []
    for (name, d_layer), (_, s_layer) in zip(moe_layers(dense), moe_layers(sparse), strict=True):
        x = tokens[name].reshape(-1, tokens[name].shape[-1])
        agree.append((d_layer.router(x).logits.argmax(-1) == s_layer.router(x).logits.argmax(-1)).float().mean())
    print(f"top-1 agreement per layer: {' / '.join(f'{float(a):.1%}' for a in agree)}")  # README figure (pytest -s)
    assert min(agree) >= 0.9, f"top-1 agreement per layer {agree}"

    saved = json.loads((out / "report.json").read_text())
    assert list(saved["stages"]) == ["dense", "distill", "finetune"]
    for r in saved["stages"].values():
        assert {"accuracy", "ce", "variation", "load", "gflops_per_image", "params_total", "params_active"} <= set(r)
    assert saved["stages"]["distill"]["gflops_per_image"] < saved["stages"]["dense"]["gflops_per_image"]
    assert saved["stages"]["dense"]["params_active"] == saved["stages"]["dense"]["params_total"]
    assert saved["stages"]["finetune"]["params_active"] < saved["stages"]["finetune"]["params_total"]


def test_resume_from_stage_3_and_errors(tmp_path, cli):
    f, _ = run(tmp_path)
    r = cli("densify-to-sparse", f, "--from-stage", "3", "--init", str(tmp_path / "d2s" / "stage2"), "--overwrite")
    assert r.exit_code == 0, r.output
    assert "finetune" in r.output and "report:" in r.output
    r = cli("densify-to-sparse", f, "--from-stage", "2")
    assert r.exit_code == 2 and "--init" in r.stderr
    r = cli("densify-to-sparse", f, "--from-stage", "2", "--init", str(tmp_path / "d2s" / "stage2"), "--overwrite")
    assert r.exit_code == 2 and "soft" in r.stderr
