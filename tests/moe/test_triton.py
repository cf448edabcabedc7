"""The Triton path (fused gather / scatter GEMMs) against the loop path: GLU experts with a hidden LayerNorm, no
biases, empty experts, every slot of an expert dropped, bf16 autocast, and the block table itself."""

import pytest
import torch
from timm.layers import Mlp, SwiGLU

from moe_cli.moe.dispatchers import TritonDispatcher
from moe_cli.moe.triton_gemm import block_table
from moe_cli.moe.upcycling import from_dense

# conftest.py turns on Triton's interpreter (CPU tensors) on machines without an NVIDIA GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not TritonDispatcher().supports(torch.empty(0, device=DEVICE)),
                                reason="Triton not importable")


def pair(dense, E, k, seed=0, **moe):
    torch.manual_seed(seed)
    a = from_dense(dense, E, k, impl="loop", **moe).to(DEVICE)
    with torch.no_grad():
        a.router.weight.normal_(0, 1.0)
        for p in a.experts.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = from_dense(dense, E, k, impl="triton", **moe).to(DEVICE)
    b.load_state_dict(a.state_dict())
    return a, b


def check(a, b, x, rtol=1e-4, atol=1e-5, amp=None):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        ya, yb = a(xa), b(xb)
    torch.testing.assert_close(yb.float(), ya.float(), rtol=rtol, atol=atol)
    g = torch.randn_like(ya.float())
    (ya.float() * g).sum().backward()
    (yb.float() * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=rtol, atol=atol)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("k", [1, 2])
def test_glu_experts_with_hidden_norm(k):
    a, b = pair(SwiGLU(16, 32, norm_layer=torch.nn.LayerNorm), 4, k, normalize=False)
    check(a, b, torch.randn(29, 16, device=DEVICE))


def test_no_biases_and_3d_input():
    a, b = pair(Mlp(16, 48, bias=False), 3, 2)
    check(a, b, torch.randn(2, 11, 16, device=DEVICE))


def test_empty_and_fully_dropped_experts():
    a, b = pair(Mlp(16, 32), 4, 1, capacity_factor=0.25, normalize=False)
    with torch.no_grad():
        for m in (a, b):
            m.router.weight[3] = -5.0  # positive inputs never choose expert 3
    x = torch.rand(40, 16, device=DEVICE) + 0.05
    check(a, b, x)
    assert b(x).abs().sum(-1).eq(0).any()  # tokens whose slot was dropped pass through as zero


# Triton's interpreter has no bfloat16 (numpy lacks it): on CPU the 16-bit path is checked in float16
AMP = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("amp", AMP)
def test_16bit_autocast_close_to_the_loop(amp):
    a, b = pair(Mlp(32, 64), 4, 2)
    check(a, b, torch.randn(64, 32, device=DEVICE), rtol=0.05, atol=0.05, amp=amp)


def test_block_table_covers_each_expert_in_blocks_of_one_expert():
    counts = torch.tensor([0, 130, 5, 64])
    t = block_table(counts, rows=199 + 3, block_m=64)
    rows = []
    for e, s, n in zip(t.expert.tolist(), t.start.tolist(), t.end.tolist(), strict=True):
        assert 0 <= n - s <= 64
        if n > s:
            assert t.expert_start[e] <= s and n <= t.expert_end[e]
            rows += list(range(s, n))
    assert rows == list(range(199))  # every routed row exactly once; the 3 dropped rows (sorted last) never


def test_large_problems_use_blocks_of_128_rows_and_still_match():
    from moe_cli.moe.triton_gemm import block_m

    assert block_m(640, 2) == 128 and block_m(200, 2) == 64
    a, b = pair(Mlp(16, 32), 2, 2)
    check(a, b, torch.randn(320, 16, device=DEVICE))  # 640 rows over 2 experts: 128-row blocks


def test_autotune_space_is_scattermoes():
    import triton

    from moe_cli.moe.triton_gemm import autotune_configs

    configs = autotune_configs(triton)
    assert {c.kwargs["BN"] for c in configs} == {64, 128, 256} and {c.kwargs["BK"] for c in configs} == {32, 64}
    assert {c.num_warps for c in configs} == {4, 8} and {c.num_stages for c in configs} == {3, 4}
