"""The grouped dispatcher: all experts over expert-sorted rows in one op per linear map. bf16/fp16 on CUDA (SM >=
80) runs ``F.grouped_mm``; everything else — CPU in any dtype, fp32 on CUDA — :func:`segment_linear`: one matmul
per expert written in place, input, weight and bias gradients expert by expert in one backward op, inside torch
custom ops the compiler does not look into (so it is also the graph-break-free fp32 path under torch.compile).
No host synchronisation in the traced graph. Dropped slots: segment_linear leaves them zero; for grouped_mm they
ride along in the last expert's group and are zeroed. With grouped_mm, per-expert biases and norm scales are
added by one-hot matmuls, so their gradients are matmuls, not atomic scatters."""

from __future__ import annotations

import functools
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


def _segments(sizes: list[int], *row_tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each tensor's rows split by the group sizes (views, one split per tensor): the tuple of each group, then
    the tuple of the rows past the last group (dropped slots)."""
    return list(zip(*(t.split([*sizes, t.shape[0] - sum(sizes)]) for t in row_tensors), strict=True))


@torch.library.custom_op("moe_cli::segment_linear", mutates_args=())
def segment_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of ``x`` (R, I) times ``w[e]`` (E, O, I) transposed, plus ``b[e]``; rows
    past the last group give zeros: a grouped linear map in any dtype. One matmul per group with rows, written in
    place into the output (no concatenation, no copy of the weights). An opaque op to torch.compile (the group
    sizes are read on the host inside it), so fp32 models compile without a graph break where ``F.grouped_mm``
    takes 16-bit CUDA inputs only."""
    out = x.new_empty(x.shape[0], w.shape[1])
    sizes = _group_sizes(offsets)
    *groups, (_, rest) = _segments(sizes, x, out)
    rest.zero_()  # rows of no group (dropped slots)
    w_t, b_e = w.transpose(1, 2).unbind(0), (b.unbind(0) if b is not None else None)
    for e, (x_g, out_g) in enumerate(groups):  # an expert without rows: an empty product, nothing written
        if b_e is None:
            torch.mm(x_g, w_t[e], out=out_g)
        else:
            torch.addmm(b_e[e], x_g, w_t[e], out=out_g)
    return out


@segment_linear.register_fake
def _(x, w, b, offsets):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("moe_cli::segment_linear_backward", mutates_args=())
def segment_linear_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                            need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (R, I), dW (E, O, I), db (E, O)) of :func:`segment_linear`, each one computed where ``need`` says
    (else an empty tensor): dx[g] = dy[g] w[e], dW[e] = dy[g]^T x[g], db[e] = sum of dy[g], group by group while
    the expert's weights and rows are in cache, written in place; experts without rows get zero gradients."""
    E, O, I = w.shape  # noqa: E741
    dx = x.new_empty(x.shape) if need[0] else x.new_empty(0)
    dw = w.new_empty(E, O, I) if need[1] else w.new_empty(0)
    db = w.new_empty(E, O) if need[2] else w.new_empty(0)
    sizes = _group_sizes(offsets)
    *groups, (_, _, rest) = _segments(sizes, dy, x, dx if need[0] else x.new_empty(x.shape[0], 0))
    rest.zero_()  # dx of the rows of no group (dropped slots)
    ws, dws, dbs = w.unbind(0), (dw.unbind(0) if need[1] else ()), (db.unbind(0) if need[2] else ())
    for e, (g, x_g, dx_g) in enumerate(groups):  # an expert without rows: products and sums over no rows, zeros
        if need[0]:
            torch.mm(g, ws[e], out=dx_g)
        if need[1]:
            torch.mm(g.T, x_g, out=dws[e])
        if need[2]:
            torch.sum(g, 0, out=dbs[e])
    return dx, dw, db


@segment_linear_backward.register_fake
def _(dy, x, w, offsets, need):
    E, O, I = w.shape  # noqa: E741
    return (x.new_empty(x.shape) if need[0] else x.new_empty(0), w.new_empty(E, O, I) if need[1] else w.new_empty(0),
            w.new_empty(E, O) if need[2] else w.new_empty(0))


def _segment_setup(ctx, inputs, output):
    x, w, b, offsets = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, offsets)


def _segment_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    dx, dw, db = segment_linear_backward(dy.contiguous(), x, w, offsets, need)
    return tuple(g if n else None for g, n in zip((dx, dw, db), need, strict=True)) + (None,)


segment_linear.register_autograd(_segment_backward, setup_context=_segment_setup)


@dataclass(frozen=True)
class GroupedPlan(GroupedOps):
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    offsets: torch.Tensor  # (E,) int32 end row of each group; dropped rows after the last (segment) or in it
    row_expert: torch.Tensor  # (R,) expert of each row, E for dropped rows
    order: torch.Tensor  # (T*S,) slot index of each sorted position
    dtype: torch.dtype
    segment: bool  # segment_linear (dropped rows come out zero) rather than grouped_mm

    @functools.cached_property
    def one_hot_RE(self) -> torch.Tensor:
        """(R, E) expert of each row in the compute dtype (all zero for dropped rows)."""
        return F.one_hot(self.row_expert, self.counts.shape[0])[:, :-1].to(self.dtype)

    def linear(self, x_RI, w_EOI, b_EO, first):
        x, w = x_RI.to(self.dtype), w_EOI.to(self.dtype)
        b = b_EO.to(self.dtype) if b_EO is not None else None
        if self.segment:
            return segment_linear(x, w, b, self.offsets)
        y = F.grouped_mm(x, w.transpose(-2, -1), offs=self.offsets)
        return y + self.one_hot_RE @ b if b is not None else y

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

    def preferred(self, x, experts):
        """bf16 on a GPU that has grouped GEMMs; on CPU always (segment_linear: as fast as the loop at 2-8 experts,
        faster from 16 on and at small batches, bit-identical to it; bench/RESULTS.md, the sweeps over E and T);
        under torch.compile everywhere (no host sync in the traced graph)."""
        if compute_dtype(x) == torch.bfloat16 and grouped_supported(x, experts.dims):
            return True
        return x.device.type == "cpu" or torch.compiler.is_compiling()

    def runs_grouped_mm(self, x, experts) -> bool:
        """Whether the plan runs ``F.grouped_mm`` under autograd (16-bit on a CUDA GPU that has grouped GEMMs)
        rather than :func:`segment_linear`."""
        return compute_dtype(x) in (torch.bfloat16, torch.float16) and grouped_supported(x, experts.dims)

    def dispatch(self, x_TD, expert_TS, experts):
        T, S = expert_TS.shape
        E = experts.num_experts
        counts, key, order = sort_dropped_last(expert_TS, E)
        x_RD = x_TD.index_select(0, torch.div(order, S, rounding_mode="floor"))
        dtype = compute_dtype(x_TD)
        segment = not self.runs_grouped_mm(x_TD, experts)
        offsets = counts[1:].cumsum(0)
        if not segment:  # grouped_mm leaves rows past the last group unwritten: the dropped rows ride in it
            offsets[-1] += counts[0]
        return x_RD, GroupedPlan(counts, offsets.to(torch.int32), key.index_select(0, order), order, dtype, segment)

    def combine(self, y_RO, plan: GroupedPlan, weight_TS):
        if not plan.segment:  # dropped rows ran through the last expert: zero them
            y_RO = torch.where((plan.row_expert < plan.offsets.shape[0]).unsqueeze(-1), y_RO, 0.0)
        return weighted_sum(y_RO.index_select(0, inverse_permutation(plan.order)), weight_TS)
