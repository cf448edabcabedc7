"""The grouped dispatcher's plan for 16-bit CUDA (``F.grouped_mm`` over all expert-sorted rows under autograd,
dropped slots riding in the last expert's group and zeroed, per-expert biases and norm scales by one-hot matmuls)
run on CPU, where ``F.grouped_mm`` takes fp32: outputs and every gradient against the loop dispatcher, with
empty experts and dropped slots. On a CUDA machine the same plan runs in bf16 (tests/moe/test_cuda.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import dispatcher_run
from timm.layers import Mlp, SwiGLU
from tolerance import tolerance

from moe_cli.moe.dispatchers import DISPATCHERS, GroupedDispatcher
from moe_cli.moe.upcycling import from_dense

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no F.grouped_mm")


class GroupedMMEverywhere(GroupedDispatcher):
    """The grouped dispatcher with the plan it runs on 16-bit CUDA, on any device and dtype."""

    def runs_grouped_mm(self, x, experts):
        return True


@pytest.mark.parametrize("ffn", ["mlp", "swiglu_norm", "mlp_no_bias"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_grouped_mm_plan_matches_the_loop(ffn, capacity_factor, amp):
    """fp32, and bf16 autocast as on a GPU (then against the fp32 loop, to a few bf16 epsilons of each tensor's
    magnitude: the bf16 loop itself is 0.5% off)."""
    torch.manual_seed(0)
    dense = {"mlp": Mlp(16, 32), "mlp_no_bias": Mlp(16, 32, bias=False),
             "swiglu_norm": SwiGLU(16, 32, norm_layer=torch.nn.LayerNorm)}[ffn]
    moe = from_dense(dense, 4, 2, capacity_factor=capacity_factor, normalize=False)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
        moe.router.weight[3] = -5.0  # positive inputs never choose expert 3: an expert without rows
        for p in moe.experts.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(29, 16) + 0.05
    if capacity_factor is not None:
        assert (moe.router(x).expert < 0).any()  # some slots dropped
    c_ref, ref = dispatcher_run(DISPATCHERS["loop"], moe, x)
    c, got = dispatcher_run(GroupedMMEverywhere(), moe, x, amp)
    assert torch.equal(c, c_ref) and c[3] == 0
    for name, b in ref.items():
        rtol, atol = tolerance(b, amp, ulps=4 if amp else 64)
        torch.testing.assert_close(got[name].float(), b, rtol=rtol, atol=atol, msg=name)
    assert got["w1"][3].abs().max() == 0  # the expert without rows gets no gradient
