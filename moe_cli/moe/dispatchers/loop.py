"""The loop dispatcher: one ``F.linear`` per expert over its contiguous rows. Runs anywhere (the reference the
other dispatchers are tested against); reads the group sizes on the host (one sync per layer, and a graph break
under torch.compile)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_cli.moe.dispatch import Dispatcher, combine_sorted, gather_sorted, per_expert, sort_dropped_first


@dataclass(frozen=True)
class LoopPlan:
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    group_sizes: list[int]  # rows of each expert, host side
    order: torch.Tensor  # (T*S,) slot index of each sorted position, dropped slots first
    dropped: int

    def apply(self, ffn, x_RD, params):
        """``ffn`` on each expert's rows with that expert's weights; the outputs concatenated."""
        weights = per_expert(params)
        chunks = x_RD.split(self.group_sizes)
        outs = [ffn(chunk, DENSE, weights[e]) for e, chunk in enumerate(chunks) if self.group_sizes[e]]
        if not outs:  # no rows: an empty pass through the first expert keeps input and weights in the autograd
            return ffn(x_RD, DENSE, weights[0])  # graph (expert parallelism: every rank's backward must run)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class DenseOps:
    """One expert's linear maps: plain F.linear."""

    def linear(self, x_RI, w, b, first):
        return F.linear(x_RI, w, b)

    def scale_shift(self, h_RH, w, b):
        return h_RH * w + b


DENSE = DenseOps()


class LoopDispatcher(Dispatcher):
    name = "loop"

    def dispatch(self, x_TD, expert_TS, experts):
        counts, order = sort_dropped_first(expert_TS, experts.num_experts)
        sizes = counts.tolist()
        x_RD = gather_sorted(x_TD, order, sizes[0], expert_TS.shape[1])
        return x_RD, LoopPlan(counts, sizes[1:], order, sizes[0])

    def combine(self, y_RO, plan: LoopPlan, weight_TS):
        return combine_sorted(y_RO, plan.order, plan.dropped, weight_TS)
