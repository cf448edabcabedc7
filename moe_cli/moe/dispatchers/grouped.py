"""The grouped dispatcher: all experts in grouped GEMMs (``F.grouped_mm``) over expert-sorted rows; bf16 on
CUDA (SM >= 80), any float dtype on CPU. No host synchronisation: dropped slots ride along in the last expert's
group and are zeroed. Per-expert biases and norm scales are added by one-hot matmuls, so their gradients are
matmuls, not atomic scatters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_cli.moe.dispatch import (
    Dispatcher,
    GroupedOps,
    compute_dtype,
    inverse_permutation,
    sort_dropped_last,
    weighted_sum,
)


@dataclass(frozen=True)
class GroupedPlan(GroupedOps):
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    offsets: torch.Tensor  # (E,) int32 end row of each group (dropped rows in the last)
    one_hot_RE: torch.Tensor  # (R, E) expert of each row in the compute dtype (all zero for dropped rows)
    order: torch.Tensor  # (T*S,) slot index of each sorted position
    dtype: torch.dtype

    def linear(self, x_RI, w_EOI, b_EO, first):
        y = F.grouped_mm(x_RI.to(self.dtype), w_EOI.to(self.dtype).transpose(-2, -1), offs=self.offsets)
        return y + self.one_hot_RE @ b_EO.to(self.dtype) if b_EO is not None else y

    def scale_shift(self, h_RH, w_EH, b_EH):
        return h_RH * (self.one_hot_RE @ w_EH.to(self.dtype)) + self.one_hot_RE @ b_EH.to(self.dtype)


def grouped_supported(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """grouped_mm wants bf16 on CUDA SM >= 80 and rows whose byte strides are multiples of 16."""
    if not hasattr(F, "grouped_mm") or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(d % 8 == 0 for d in dims)


class GroupedDispatcher(Dispatcher):
    name = "grouped"

    def supports(self, x):
        return hasattr(F, "grouped_mm")

    def preferred(self, x, experts):
        """bf16 on a GPU that has grouped GEMMs; in 16 bit under torch.compile anywhere (no graph break)."""
        dtype = compute_dtype(x)
        if dtype == torch.bfloat16 and grouped_supported(x, experts.dims):
            return True
        return torch.compiler.is_compiling() and dtype in (torch.bfloat16, torch.float16) and self.supports(x)

    def dispatch(self, x_TD, expert_TS, experts):
        T, S = expert_TS.shape
        E = experts.num_experts
        counts, key, order = sort_dropped_last(expert_TS, E)
        row_expert = key.index_select(0, order)
        x_RD = x_TD.index_select(0, torch.div(order, S, rounding_mode="floor"))
        offsets = counts[1:].cumsum(0)
        offsets[-1] += counts[0]
        dtype = compute_dtype(x_TD)
        one_hot = F.one_hot(row_expert, E + 1)[:, :E].to(dtype)  # dropped rows (E) get no expert
        return x_RD, GroupedPlan(counts, offsets.to(torch.int32), one_hot, order, dtype)

    def combine(self, y_RO, plan: GroupedPlan, weight_TS):
        kept = plan.one_hot_RE.sum(-1, keepdim=True) > 0  # dropped rows ran through the last expert: zero them
        y_RO = torch.where(kept, y_RO, 0.0)
        return weighted_sum(y_RO.index_select(0, inverse_permutation(plan.order)), weight_TS)
