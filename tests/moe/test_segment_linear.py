"""The grouped dispatcher's segment ops (its CPU and fp32 path): one matmul per expert written in place, the
backward (input, weight and bias gradients) expert by expert, against plain per-group matmuls; experts without
rows get zero gradients; rows past the last group (dropped slots) give zero outputs and zero gradients; the op
is registered correctly as a torch custom op (fake tensors, autograd). And auto's choice on CPU."""

import pytest
import torch
from tolerance import assert_close_scaled

from moe_cli.moe.dispatchers.grouped import segment_linear


@pytest.mark.parametrize("bias", [True, False])
def test_segment_linear_is_per_group_matmuls_with_empty_groups(bias):
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 0, 4]  # two experts without rows, one of them the first
    x = torch.randn(sum(sizes) + 2, 8, generator=gen, dtype=torch.float64).requires_grad_()  # + 2 dropped rows
    w = torch.randn(len(sizes), 6, 8, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(len(sizes), 6, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    y = segment_linear(x, w, b, offsets)
    chunks = x.split(sizes + [2])
    want = torch.cat([chunks[e] @ w[e].T + (b[e] if bias else 0) for e in range(len(sizes)) if sizes[e]]
                     + [0 * chunks[-1][:, :6]])  # rows of no group: zero, and no gradient
    assert_close_scaled(y, want)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    inputs = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad((y * g).sum(), inputs)
    ref = torch.autograd.grad((want * g).sum(), inputs)
    for a, r in zip(got, ref, strict=True):
        assert_close_scaled(a, r)
    assert torch.count_nonzero(got[1][[1, 3]]) == 0  # experts 1 and 3 had no rows
    assert torch.count_nonzero(y[-2:]) == 0 and torch.count_nonzero(got[0][-2:]) == 0
    torch.library.opcheck(segment_linear, (x, w, b, offsets))


def test_auto_takes_the_grouped_path_on_cpu_and_trains_as_the_loop_does():
    """On CPU auto runs segment_linear at every expert count (measured no slower than the loop). It runs the
    loop's GEMMs (same shapes, same summation order), so five AdamW steps with capacity drops end on the same
    weights (bit for bit on this machine, which is why the switch moved no README figure; compared here to a
    few ulps, as BLAS builds may differ)."""
    from moe_cli.moe.layer import MoEMlp

    x = torch.randn(4, 8)
    picked = {E: MoEMlp(8, 16, num_experts=E, k=2).dispatcher(x).name for E in (2, 4, 8, 16, 64)}
    assert set(picked.values()) == {"grouped"}, picked
    trained = {}
    for impl in ("loop", "grouped"):
        torch.manual_seed(0)
        layer = MoEMlp(16, 32, num_experts=4, k=2, capacity_factor=1.0, impl=impl)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        for _ in range(5):
            layer(torch.randn(64, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        trained[impl] = layer.state_dict()
    for name, w in trained["loop"].items():
        assert_close_scaled(trained["grouped"][name], w, ulps=16)
