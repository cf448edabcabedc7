"""MoEMlp against a slow reference written straight from the equations (every expert evaluated)."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU
from tolerance import assert_close_scaled

from moe_cli.errors import ConfigError
from moe_cli.moe.layer import MoEMlp
from moe_cli.moe.recorder import RoutingRecorder
from moe_cli.moe.upcycling import from_dense


def reference(moe: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """y = sum_i W[t, i] f_i(x_t) with an explicit (T, E) weight matrix and every expert run on every token."""
    ex = moe.experts
    logits = x.float() @ moe.router.weight.float().T
    probs = logits.softmax(-1)
    if moe.cfg.gate == "soft":
        W = probs
    else:
        top, idx = logits.topk(moe.k, dim=-1)
        w = top.softmax(-1) if moe.cfg.normalize else probs.gather(-1, idx)
        W = torch.zeros_like(probs).scatter(1, idx, w)
    outs = []
    for e in range(moe.num_experts):
        h = x @ ex.w1[e].T + (ex.b1[e] if ex.b1 is not None else 0)
        h = ex.act(x @ ex.wg[e].T + ex.bg[e]) * h if ex.glu else ex.act(h)
        if ex.norm_eps is not None:
            h = F.layer_norm(h, h.shape[-1:], ex.norm_w[e], ex.norm_b[e], ex.norm_eps)
        outs.append(h @ ex.w2[e].T + (ex.b2[e] if ex.b2 is not None else 0))
    return torch.einsum("te,etd->td", W, torch.stack(outs))


def make_moe(kind: str, E: int, k: int, gate: str = "topk", normalize: bool = True, seed: int = 0) -> MoEMlp:
    torch.manual_seed(seed)
    dense = Mlp(16, 24) if kind == "mlp" else SwiGLU(16, 24, norm_layer=torch.nn.LayerNorm)
    moe = from_dense(dense, E, k, noise_std=0.1, gate=gate, normalize=normalize,
                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a router strong enough that routing differs between tokens
        moe.router.weight.normal_(0, 1.0)
        for p in moe.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return moe


def grads(module, x, y):
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    params = [x, *module.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("gate,k,normalize", [("topk", 1, True), ("topk", 2, True), ("topk", 2, False),
                                              ("soft", 1, True)])
def test_matches_reference_outputs_and_grads(kind, gate, k, normalize):
    moe = make_moe(kind, 4, k, gate, normalize)
    x = torch.randn(37, 16, requires_grad=True)  # T not a multiple of 8
    y, y_ref = moe(x), reference(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g_moe = grads(moe, x, y)
    for g, g_ref in zip(g_moe, grads(moe, x, y_ref), strict=True):
        if g is None:
            assert g_ref is None or g_ref.abs().max() == 0
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    router_grad = g_moe[1].abs().sum()
    if gate == "topk" and k == 1 and normalize:
        assert router_grad == 0  # softmax over one kept logit is constant 1: no router signal (use normalize=False)
    else:
        assert router_grad > 0, "router must receive a gradient"


def test_expert_with_no_tokens():
    moe = make_moe("mlp", 4, 2)
    with torch.no_grad():
        moe.router.weight[3] = -5.0  # positive inputs -> expert 3 always last
    x = torch.rand(20, 16, requires_grad=True) + 0.1
    with RoutingRecorder(moe) as rec:
        y = moe(x)
    counts = rec.records[""].counts
    assert counts.tolist()[3] == 0
    assert counts.sum().item() == 20 * 2
    torch.testing.assert_close(y, reference(moe, x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert moe.experts.w1.grad[3].abs().max() == 0
    assert moe.experts.w1.grad[:3].abs().max() > 0


def test_upcycled_equals_dense_and_leading_dims_kept():
    torch.manual_seed(1)
    dense = Mlp(16, 32).eval()
    moe = from_dense(dense, 8, 2).eval()
    x = torch.randn(3, 5, 16)
    out = moe(x)
    assert out.shape == (3, 5, 16)
    assert_close_scaled(out, dense(x))


def test_autocast_bf16_cpu():
    moe = make_moe("mlp", 4, 2)
    x = torch.randn(33, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        logits = moe.router(x).logits
    assert y.dtype == torch.bfloat16
    assert logits.dtype == torch.float32  # router stays fp32 under autocast
    torch.testing.assert_close(y.float(), reference(moe, x), rtol=0.05, atol=0.05)


def test_aux_losses_hand_computed():
    moe = MoEMlp(4, 8, num_experts=2, k=1)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    with RoutingRecorder(moe, aux=True) as rec:
        moe(x)
    aux = rec.records[""]
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    probs = torch.stack([p, p, p.flip(0)])
    frac = torch.tensor([2 / 3, 1 / 3])
    expected_lb = 2 * (frac * probs.mean(0)).sum()
    torch.testing.assert_close(aux.load_balance, expected_lb)
    expected_z = torch.logsumexp(torch.tensor([2.0, 0.0]), 0) ** 2
    torch.testing.assert_close(aux.z_loss, expected_z)


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_experts": 0}, "experts must be at least 1, got 0"),
    ({"num_experts": 2, "k": 3}, "k must be between 1 and experts (2), got 3"),
    ({"gate": "nope"}, "gate must be one of topk, sigmoid_topk, top_p, soft, expert_choice, got 'nope'"),
    ({"impl": "cuda"}, "impl must be one of auto, triton, grouped, loop, got 'cuda'"),
    ({"num_experts": 4, "k": 2, "disabled": (0, 1, 2)}, "leaves 1 expert(s), fewer than k=2"),
])
def test_bad_arguments_name_the_field_and_what_was_expected(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        MoEMlp(4, 8, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
