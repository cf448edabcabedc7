"""MoE features of current systems against hand-written references: the Switch load-balance definition under a
capacity limit, shared experts (DeepSeek-MoE / Qwen2-MoE), aux-loss-free balancing and sigmoid gates
(DeepSeek-V3), and the routing-health monitor of the loop."""


import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU

from moe_cli.errors import ConfigError
from moe_cli.moe.dispatchers import TritonDispatcher
from moe_cli.moe.recorder import RoutingRecorder
from moe_cli.moe.upcycling import from_dense

IMPLS = ["loop", "grouped", pytest.param("triton", marks=pytest.mark.skipif(
    not TritonDispatcher().supports(torch.empty(0)), reason="Triton not importable"))]


def ffn(bank, e, x):
    """Expert ``e`` of an expert bank, from its equations."""
    h = x @ bank.w1[e].T + (bank.b1[e] if bank.b1 is not None else 0)
    h = bank.act(x @ bank.wg[e].T + (bank.bg[e] if bank.bg is not None else 0)) * h if bank.glu else bank.act(h)
    return h @ bank.w2[e].T + (bank.b2[e] if bank.b2 is not None else 0)


def reference(layer, x, W):
    """sum_e W[t, e] f_e(x_t) (+ gated shared experts), every expert on every token."""
    y = sum(W[:, e:e + 1] * ffn(layer.experts, e, x) for e in range(layer.num_experts))
    if layer.shared is not None:
        shared = sum(ffn(layer.shared, j, x) for j in range(layer.shared.num_experts))
        gate = torch.sigmoid(x @ layer.shared_gate.weight.T) if layer.shared_gate is not None else 1.0
        y = y + gate * shared
    return y


def perturbed(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return layer


def check_grads(layer, x, y, y_ref):
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, *[p for p in layer.parameters() if p.requires_grad]]
    got = torch.autograd.grad((y * g).sum(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad((y_ref * g).sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ 1. Switch definition


def test_load_balance_counts_the_choices_before_the_capacity_limit():
    """Switch / GShard / V-MoE: f_i is the share of the router's choices, not of what survived the capacity."""
    layer = from_dense(Mlp(4, 8), 4, 1, capacity_factor=0.5)  # C = ceil(0.5 * 30 / 4) = 4 tokens per expert
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4) * 3)
    choice = torch.tensor([0] * 20 + [1] * 5 + [2] * 3 + [3] * 2)
    x = F.one_hot(choice, 4).float()
    with RoutingRecorder(layer, aux=True) as rec:
        layer(x)
    probs = (x @ layer.router.weight.T).softmax(-1)
    f = torch.tensor([20, 5, 3, 2]) / 30
    switch = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(rec.records[""].load_balance, switch)
    kept = torch.tensor([4, 4, 3, 2]) / 30  # what the old definition counted
    assert switch > 2 * (4 * (kept * probs.mean(0)).sum())
    assert rec.records[""].counts.tolist() == [4, 4, 3, 2]  # routing itself still drops the overflow


# ------------------------------------------------------------------------------------------ 2. shared experts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_match_the_reference(impl, gated):
    torch.manual_seed(0)
    layer = perturbed(from_dense(SwiGLU(16, 24), 4, 2, shared_experts=2, shared_gate=gated, impl=impl))
    x = torch.randn(19, 16, requires_grad=True)
    logits = x @ layer.router.weight.T
    top, idx = logits.topk(2, -1)
    W = torch.zeros_like(logits).scatter(1, idx, top.softmax(-1))
    check_grads(layer, x, layer(x), reference(layer, x, W))


@pytest.mark.parametrize("init,k", [("copy", 2), ("split", 4)])
@pytest.mark.parametrize("gated", [False, True])
def test_upcycling_with_shared_experts_still_computes_the_dense_ffn(init, k, gated):
    dense = Mlp(16, 40).eval()
    layer = from_dense(dense, 4, k, shared_experts=1, shared_gate=gated, init=init).eval()
    x = torch.randn(11, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_matches_transformers_qwen2_moe_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, hidden_act="silu")
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():  # transformers >= 5 leaves a bare module's weights uninitialised
        torch.nn.init.normal_(p, std=0.1)
    layer = from_dense(SwiGLU(16, 24, bias=False), 4, 2, shared_experts=1, shared_gate=True).eval()
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        if hasattr(block.experts, "gate_up_proj"):  # transformers >= 5: fused (E, 2H, D) gate-then-up, (E, D, H)
            gate, up = block.experts.gate_up_proj.chunk(2, dim=1)
            layer.experts.wg.copy_(gate)
            layer.experts.w1.copy_(up)
            layer.experts.w2.copy_(block.experts.down_proj)
        else:  # transformers 4: one module per expert
            for e, expert in enumerate(block.experts):
                layer.experts.w1[e].copy_(expert.up_proj.weight)
                layer.experts.wg[e].copy_(expert.gate_proj.weight)
                layer.experts.w2[e].copy_(expert.down_proj.weight)
        layer.shared.w1[0].copy_(block.shared_expert.up_proj.weight)
        layer.shared.wg[0].copy_(block.shared_expert.gate_proj.weight)
        layer.shared.w2[0].copy_(block.shared_expert.down_proj.weight)
        layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    x = torch.randn(2, 5, 16)
    out = block(x)
    torch.testing.assert_close(layer(x), out[0] if isinstance(out, tuple) else out, rtol=1e-5, atol=1e-5)


def test_merging_to_one_dense_ffn_refuses_shared_experts():
    from moe_cli.models.reduce import dense_weights

    with pytest.raises(ConfigError, match="shared experts"):
        dense_weights(from_dense(Mlp(4, 8), 1, 1, shared_experts=1), "blocks.0.mlp")


# ------------------------------------------------------------------------------------------ 3./4. DeepSeek-V3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (False, 2.5)])
def test_sigmoid_gate_matches_the_reference(impl, normalize, scale):
    torch.manual_seed(1)
    layer = perturbed(from_dense(Mlp(16, 24), 6, 2, gate="sigmoid_topk", normalize=normalize, route_scale=scale,
                                 impl=impl))
    x = torch.randn(23, 16, requires_grad=True)
    s = torch.sigmoid(x @ layer.router.weight.T)
    idx = s.topk(2, -1).indices
    w = s.gather(-1, idx)
    w = (w / w.sum(-1, keepdim=True) if normalize else w) * scale
    check_grads(layer, x, layer(x), reference(layer, x, torch.zeros_like(s).scatter(1, idx, w)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["topk", "sigmoid_topk"])
def test_aux_free_bias_changes_the_choice_not_the_weights(impl, gate):
    torch.manual_seed(2)
    layer = perturbed(from_dense(Mlp(16, 24), 4, 1, gate=gate, balance="aux_free", normalize=False, impl=impl))
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # expert 3 wins every selection
    x = torch.randn(13, 16, requires_grad=True)
    logits = x @ layer.router.weight.T
    scores = logits.softmax(-1) if gate == "topk" else torch.sigmoid(logits)  # raw affinity of expert 3
    W = torch.zeros_like(logits)
    W[:, 3] = scores[:, 3]
    check_grads(layer, x, layer(x), reference(layer, x, W))
    assert "router.expert_bias" in layer.state_dict()  # saved with the model


def test_bias_update_rule_by_hand():
    layer = from_dense(Mlp(4, 8), 4, 1, balance="aux_free", bias_update=0.01)
    layer.update_balance(torch.tensor([10, 2, 2, 2]))  # mean 4: expert 0 over, the others under
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    layer.update_balance(torch.tensor([4, 4, 4, 4]))
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_pruning_keeps_the_kept_experts_balancing_bias():
    layer = from_dense(Mlp(4, 8), 4, 1, balance="aux_free")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    layer.select_experts([3, 1])
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([0.4, 0.2]))


@pytest.mark.parametrize("fields,needle", [
    ({"gate": "soft", "balance": "aux_free"}, "balance aux_free biases which experts"),
    ({"shared_gate": True}, "shared_gate gates the shared experts"),
    ({"gate": "sigmoid_topk", "route_scale": 0}, "route_scale must be a finite number > 0"),
])
def test_bad_combinations(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dense(Mlp(4, 8), 4, 1, **fields)


def test_upcycle_cli_proves_the_new_layers_reproduce_the_dense_model(cli, tmp_path):
    from conftest import model_args

    base = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]
    for extra in (["--shared-experts", "1", "--shared-gate"], ["--gate", "sigmoid_topk"],
                  ["--balance", "aux_free"], ["--init", "split", "--k", "4", "--experts", "4", "--shared-experts",
                                              "2"]):
        out = tmp_path / "_".join(a.strip("-") for a in extra)
        r = cli("upcycle", *base, *extra, "--out", str(out))
        assert r.exit_code == 0 and "ok" in r.output, (extra, r.output)
    r = cli("upcycle", *base, "--gate", "sigmoid_topk", "--route-scale", "2", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "--route-scale 2.0" in r.stderr


# ------------------------------------------------------------------------------------------ 5. routing health


def test_a_collapsed_router_gives_exactly_one_warning_line(cli, tmp_path):
    import json

    from conftest import write_recipe

    from moe_cli.io.checkpoint import load_checkpoint, save

    f = write_recipe(tmp_path / "r0.yaml", tmp_path / "up", model={"upcycle": {"experts": 4, "k": 1, "layers": "0"}},
                     train={"steps": 1})
    assert cli("finetune", f).exit_code == 0
    ck = load_checkpoint(tmp_path / "up" / "final")
    with torch.no_grad():  # the FFN's input is about (1, ..., 1) for every token, and only expert 0 likes it
        ck.model.blocks[0].norm2.weight.fill_(0.01)
        ck.model.blocks[0].norm2.bias.fill_(1.0)
        ck.model.blocks[0].mlp.router.weight.zero_()
        ck.model.blocks[0].mlp.router.weight[0].fill_(1.0)
    save(ck, tmp_path / "collapsed")
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model={"source": str(tmp_path / "collapsed"), "kwargs": {}},
                     optim={"lr": 1e-9}, train={"steps": 6, "log_every": 1, "batch_size": 16})
    r = cli("finetune", f)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if "warning:" in line]
    assert len(warnings) == 1, r.output
    assert "`blocks.0.mlp`: expert(s) 1, 2, 3" in warnings[0] and "3 log intervals" in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "warning"] == [3]
    loads = [r["routing"]["blocks.0.mlp"]["load"] for r in records if r["split"] == "train"]
    assert len(loads) == 6 and all(v[0] == 1.0 for v in loads)
    # moe inspect draws the load over training from the run's metrics.jsonl
    from matplotlib.image import imread

    r = cli("inspect", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "insp"), "--images", "1")
    assert r.exit_code == 0, r.output
    image = imread(tmp_path / "insp" / "load_over_training.png")
    assert image.ndim == 3 and min(image.shape[:2]) >= 150 and image[..., :3].std() > 0.05
