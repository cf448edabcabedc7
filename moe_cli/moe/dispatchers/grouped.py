"""The grouped dispatcher: all experts in grouped GEMMs (``F.grouped_mm``) over expert-sorted rows, bf16 on
CUDA (SM >= 80); in fp32, :func:`segment_linear` (one matmul per expert inside one op torch.compile does not
look into), so it is also the graph-break-free fp32 path under torch.compile. No host synchronisation in the
traced graph: dropped slots ride along in the last expert's group and are zeroed. Per-expert biases and norm
scales are added by one-hot matmuls, so their gradients are matmuls, not atomic scatters."""

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


def _group_sizes(offsets: torch.Tensor) -> list[int]:
    """Rows of each group from the groups' end offsets (read on the host: inside the custom ops only)."""
    return torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long()).tolist()


@torch.library.custom_op("moe_cli::segment_linear", mutates_args=())
def segment_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of ``x`` (R, I) times ``w[e]`` (E, O, I) transposed: a grouped linear map
    in any dtype, one matmul per group. An opaque op to torch.compile (the group sizes are read on the host inside
    it), so fp32 models compile without a graph break where ``F.grouped_mm`` takes 16-bit inputs only."""
    sizes = _group_sizes(offsets)
    w_t = w.transpose(1, 2)
    outs = [chunk @ w_t[e] for e, chunk in enumerate(x.split(sizes)) if sizes[e]]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


@segment_linear.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("moe_cli::segment_weight_grad", mutates_args=())
def segment_weight_grad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = dy[group e]^T x[group e]: (E, O, I)."""
    sizes = _group_sizes(offsets)
    return torch.stack([a.T @ b for a, b in zip(dy.split(sizes), x.split(sizes), strict=True)])


@segment_weight_grad.register_fake
def _(dy, x, offsets):
    return dy.new_empty(offsets.shape[0], dy.shape[1], x.shape[1])


def _segment_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _segment_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dx = segment_linear(dy, w.transpose(1, 2).contiguous(), offsets) if ctx.needs_input_grad[0] else None
    dw = segment_weight_grad(dy, x, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


segment_linear.register_autograd(_segment_backward, setup_context=_segment_setup)


@dataclass(frozen=True)
class GroupedPlan(GroupedOps):
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    offsets: torch.Tensor  # (E,) int32 end row of each group (dropped rows in the last)
    one_hot_RE: torch.Tensor  # (R, E) expert of each row in the compute dtype (all zero for dropped rows)
    order: torch.Tensor  # (T*S,) slot index of each sorted position
    dtype: torch.dtype

    def linear(self, x_RI, w_EOI, b_EO, first):
        x, w = x_RI.to(self.dtype), w_EOI.to(self.dtype)
        if self.dtype in (torch.bfloat16, torch.float16):
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=self.offsets)
        else:  # fp32: grouped_mm takes 16 bit (and torch.compile traces it so)
            y = segment_linear(x, w, self.offsets)
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
        """bf16 on a GPU that has grouped GEMMs; under torch.compile everywhere (no host sync in the traced graph:
        16 bit runs grouped GEMMs, fp32 the opaque :func:`segment_linear`)."""
        dtype = compute_dtype(x)
        if dtype == torch.bfloat16 and grouped_supported(x, experts.dims):
            return True
        return torch.compiler.is_compiling() and self.supports(x)

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
