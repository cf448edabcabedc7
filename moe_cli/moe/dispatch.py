"""The dispatcher contract: group a layer's (token, slot) pairs by expert, let the experts run on the grouped
rows, and put the outputs back in token order.

A dispatcher (one module each under :mod:`moe_cli.moe.dispatchers`, listed in its registry) does three things:

- :meth:`Dispatcher.dispatch` — rows of the input grouped expert by expert, and a small frozen *plan* of its own
  type that says how the experts' FFN runs over those rows (:class:`Plan`);
- the experts run ``experts(x_RD, plan)`` (:class:`~moe_cli.moe.experts.Experts`: one FFN for all dispatchers,
  which the plan applies expert by expert or over all rows with grouped linear maps, :class:`Ops`);
- :meth:`Dispatcher.combine` — back to token order, weighted sum over each token's slots.

Combining is an elementwise weighted sum (deterministic, no ``index_add_``). Shapes in names: T tokens, S slots
per token, R grouped rows, E experts, D / H / O input, hidden and output features.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moe_cli.moe.routing import Routing


class Ops(Protocol):
    """The linear maps of :meth:`Experts.ffn <moe_cli.moe.experts.Experts.ffn>`: plain ones for one expert's rows,
    or grouped ones (row r times its expert's weights) over rows of all experts."""

    def linear(self, x_RI: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, first: bool) -> torch.Tensor:
        """x w^T + b; ``first``: an input projection (over the rows as dispatched), else the output projection
        (over the hidden rows the first produced)."""
        ...

    def scale_shift(self, h_RH: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """h * w + b per row (the hidden LayerNorm's affine part)."""
        ...


class Plan(Protocol):
    """What a dispatcher hands the experts with the grouped rows."""

    counts: torch.Tensor  # (E + 1,) slots per expert, index 0 = dropped

    def apply(self, ffn, x_RD: torch.Tensor, params: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``ffn(x, ops, params)`` over the grouped rows: (R, D) -> (R, O)."""
        ...


class GroupedOps:
    """Plans that run all experts at once are their own ops: ``ffn`` sees the stacked (E, ...) weights."""

    def apply(self, ffn, x_RD, params):
        return ffn(x_RD, self, params)


def per_expert(params: dict[str, torch.Tensor | None]) -> list[dict[str, torch.Tensor | None]]:
    """Stacked (E, ...) expert tensors -> one dict of 2-d weights per expert. Each tensor is unbound once, so its
    backward stacks the per-expert grads in one allocation."""
    unbound = {n: p.unbind(0) if p is not None else None for n, p in params.items()}
    experts = next(len(v) for v in unbound.values() if v is not None)
    return [{n: v[e] if v is not None else None for n, v in unbound.items()} for e in range(experts)]


def expert_counts(expert_TS: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E + 1,) counts of slots per expert, index 0 = dropped (-1); no host synchronisation."""
    flat = expert_TS.reshape(-1) + 1
    return torch.zeros(num_experts + 1, dtype=torch.long, device=expert_TS.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def sort_dropped_last(expert_TS: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (E+1,), sort key per slot (dropped = E), stable order of the slots by key)."""
    flat = expert_TS.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    return expert_counts(expert_TS, num_experts), key, torch.argsort(key, stable=True)


def sort_dropped_first(expert_TS: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (E+1,), stable order of the slots by expert, dropped slots (-1) first); no host synchronisation."""
    return expert_counts(expert_TS, num_experts), torch.argsort(expert_TS.reshape(-1), stable=True)


def gather_sorted(x_TD: torch.Tensor, order: torch.Tensor, dropped: int, slots_per_token: int) -> torch.Tensor:
    """The token rows of the kept slots, in ``order`` (from :func:`sort_dropped_first`; ``dropped`` slots lead)."""
    return x_TD.index_select(0, torch.div(order[dropped:], slots_per_token, rounding_mode="floor"))


def combine_sorted(y_RO: torch.Tensor, order: torch.Tensor, dropped: int, weight_TS: torch.Tensor) -> torch.Tensor:
    """Outputs of the rows :func:`gather_sorted` gave back in slot order (dropped slots zero), weighted per token."""
    if dropped:
        y_slots = y_RO.new_zeros(order.numel(), y_RO.shape[-1]).index_copy(0, order[dropped:], y_RO)
    else:
        y_slots = y_RO.index_select(0, inverse_permutation(order))
    return weighted_sum(y_slots, weight_TS)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def weighted_sum(y_slots: torch.Tensor, weight_TS: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_s weight[t, s] * y_slots[t * S + s], elementwise (forward and backward are plain elementwise
    kernels; a per-token (1, S) @ (S, D) batched matmul cost 18% of the layer's GPU time)."""
    T, S = weight_TS.shape
    if S == 1:
        return y_slots * weight_TS.to(y_slots.dtype)
    return (y_slots.reshape(T, S, -1) * weight_TS.to(y_slots.dtype).unsqueeze(-1)).sum(1)


class Dispatcher:
    """y[t] = sum_s weight[t, s] * f_{expert[t, s]}(x[t]); slots with expert -1 contribute nothing."""

    name = ""

    def supports(self, x: torch.Tensor) -> bool:
        """Whether this dispatcher runs on ``x``'s device at all."""
        return True

    def preferred(self, x: torch.Tensor, experts) -> bool:
        """Whether ``impl: auto`` picks this dispatcher for ``x`` (asked in the registry's order)."""
        return True

    def dispatch(self, x_TD: torch.Tensor, expert_TS: torch.Tensor, experts) -> tuple[torch.Tensor, Plan]:
        raise NotImplementedError

    def combine(self, y_RO: torch.Tensor, plan: Plan, weight_TS: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (T, O), slots per expert (E,))."""
        x_RD, plan = self.dispatch(x_TD, routing.expert, experts)
        return self.combine(experts(x_RD, plan), plan, routing.weight), plan.counts[1:]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
