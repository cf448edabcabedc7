"""The loop dispatcher: one ``F.linear`` per expert over its contiguous rows. Runs anywhere (the CPU default);
reads the group sizes on the host (one sync per layer, and a graph break under torch.compile)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_cli.moe.dispatch import Dispatcher, expert_counts, inverse_permutation, per_expert, weighted_sum


@dataclass(frozen=True)
class LoopPlan:
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    group_sizes: list[int]  # rows of each expert, host side
    order: torch.Tensor  # (T*S,) slot index of each sorted position, dropped slots first
    dropped: int
    slots: int  # T * S

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
        T, S = expert_TS.shape
        order = torch.argsort(expert_TS.reshape(-1), stable=True)  # dropped slots (-1) sort first
        counts = expert_counts(expert_TS, experts.num_experts)
        sizes = counts.tolist()
        x_RD = x_TD.index_select(0, torch.div(order[sizes[0]:], S, rounding_mode="floor"))
        return x_RD, LoopPlan(counts, sizes[1:], order, sizes[0], T * S)

    def combine(self, y_RO, plan: LoopPlan, weight_TS):
        if plan.dropped:
            y_slots = y_RO.new_zeros(plan.slots, y_RO.shape[-1]).index_copy(0, plan.order[plan.dropped:], y_RO)
        else:
            y_slots = y_RO.index_select(0, inverse_permutation(plan.order))
        return weighted_sum(y_slots, weight_TS)
