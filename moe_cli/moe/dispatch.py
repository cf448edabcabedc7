"""Dispatchers: sort (token, slot) pairs by expert, gather the tokens, run the experts, un-permute, combine.

A dispatcher is a small object with three steps — :meth:`Dispatcher.dispatch` (group rows by expert),
:meth:`Dispatcher.run` (the experts over the grouped rows) and :meth:`Dispatcher.combine` (back to token order,
weighted sum over each token's slots) — so a fused kernel can replace any of them:

- :class:`LoopDispatcher`: one ``F.linear`` per expert over its contiguous rows (any device; the CPU default).
  Reads the group sizes on the host.
- :class:`GroupedDispatcher`: two ``F.grouped_mm`` over all experts (CUDA bf16; also runs on CPU). No host
  synchronisation: dropped slots ride along in the last group and are zeroed.
- :class:`TritonDispatcher`: ScatterMoE-style Triton kernels (:mod:`moe_cli.moe.triton_gemm`): the token
  gather is fused into the first expert GEMM and the scatter back to slot order into the second; no
  host synchronisation, no atomics. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.

All combine deterministically with an elementwise weighted sum over each token's slots (no ``index_add_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_cli.moe.routing import Routing


class ExpertBank(Protocol):
    num_experts: int

    def run_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor: ...
    def run_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor: ...
    def run_triton(self, d: Dispatched) -> torch.Tensor: ...


@dataclass
class Dispatched:
    """Rows of ``x`` grouped by expert and what is needed to put the expert outputs back."""

    x_sorted: torch.Tensor  # (rows, D) token rows, expert by expert
    order: torch.Tensor  # (T*S,) slot index of each sorted position
    counts: torch.Tensor  # (E + 1,) slots per expert, index 0 = dropped
    tokens: int
    slots: int
    group_sizes: torch.Tensor | list[int] | None = None  # what Dispatcher.run hands the experts
    row_expert: torch.Tensor | None = None  # (rows,) expert of each sorted row (grouped)
    dropped: int | None = None  # host-known dropped slots (loop)
    table: object = None  # triton: the block table (moe_cli.moe.triton_gemm.BlockTable)
    row_token: torch.Tensor | None = None  # triton: token of each sorted row


def expert_counts(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E + 1,) counts of slots per expert, index 0 = dropped (-1); no host synchronisation."""
    flat = expert.reshape(-1) + 1
    return torch.zeros(num_experts + 1, dtype=torch.long, device=expert.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def grouped_supported(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """grouped_mm wants bf16 on CUDA SM >= 80 and rows whose byte strides are multiples of 16."""
    if not hasattr(F, "grouped_mm") or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(d % 8 == 0 for d in dims)


def sort_dropped_last(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (E+1,), sort key per slot (dropped = E), stable order of the slots by key)."""
    flat = expert.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    return expert_counts(expert, num_experts), key, torch.argsort(key, stable=True)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def weighted_sum(y_slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_s weight[t, s] * y_slots[t * S + s], elementwise (forward and backward are plain elementwise
    kernels; a per-token (1, S) @ (S, D) batched matmul cost 18% of the layer's GPU time)."""
    T, S = weight.shape
    if S == 1:
        return y_slots * weight.to(y_slots.dtype)
    return (y_slots.reshape(T, S, -1) * weight.to(y_slots.dtype).unsqueeze(-1)).sum(1)


class Dispatcher:
    """y[t] = sum_s weight[t, s] * f_{expert[t, s]}(x[t]); slots with expert -1 contribute nothing."""

    name = ""

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int) -> Dispatched:
        raise NotImplementedError

    def run(self, experts: ExpertBank, d: Dispatched) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, y_sorted: torch.Tensor, d: Dispatched, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (T, D_out), slots per expert (E,))."""
        d = self.dispatch(x, routing.expert, experts.num_experts)
        return self.combine(self.run(experts, d), d, routing.weight), d.counts[1:]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LoopDispatcher(Dispatcher):
    name = "loop"

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int) -> Dispatched:
        T, S = expert.shape
        order = torch.argsort(expert.reshape(-1), stable=True)  # dropped slots (-1) sort first
        counts = expert_counts(expert, num_experts)
        count_list = counts.tolist()
        slots = order[count_list[0]:]
        x_sorted = x.index_select(0, torch.div(slots, S, rounding_mode="floor"))
        return Dispatched(x_sorted, order, counts, T, S, group_sizes=count_list[1:], dropped=count_list[0])

    def run(self, experts: ExpertBank, d: Dispatched) -> torch.Tensor:
        return experts.run_loop(d.x_sorted, d.group_sizes)

    def combine(self, y_sorted: torch.Tensor, d: Dispatched, weight: torch.Tensor) -> torch.Tensor:
        if d.dropped:
            slots = d.order[d.dropped:]
            y_slots = y_sorted.new_zeros(d.tokens * d.slots, y_sorted.shape[-1]).index_copy(0, slots, y_sorted)
        else:
            y_slots = y_sorted.index_select(0, inverse_permutation(d.order))
        return weighted_sum(y_slots, weight)


class GroupedDispatcher(Dispatcher):
    name = "grouped"

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int) -> Dispatched:
        # dropped slots sort last (key E) and ride along in the last expert's group, so no host sync is needed
        # to cut them off; their outputs are zeroed before the combine, so they get no gradient either
        T, S = expert.shape
        E = num_experts
        counts, key, order = sort_dropped_last(expert, E)
        row_expert = key.index_select(0, order)
        x_sorted = x.index_select(0, torch.div(order, S, rounding_mode="floor"))
        group_sizes = counts[1:].clone()
        group_sizes[-1] += counts[0]
        return Dispatched(x_sorted, order, counts, T, S, group_sizes=group_sizes, row_expert=row_expert)

    def run(self, experts: ExpertBank, d: Dispatched) -> torch.Tensor:
        E = experts.num_experts
        y = experts.run_grouped(d.x_sorted, d.group_sizes, d.row_expert.clamp(max=E - 1))
        return torch.where(d.row_expert.unsqueeze(-1) < E, y, 0.0)

    def combine(self, y_sorted: torch.Tensor, d: Dispatched, weight: torch.Tensor) -> torch.Tensor:
        return weighted_sum(y_sorted.index_select(0, inverse_permutation(d.order)), weight)


class TritonDispatcher(Dispatcher):
    name = "triton"

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int) -> Dispatched:
        from moe_cli.moe.triton_gemm import block_table

        T, S = expert.shape
        counts, _, order = sort_dropped_last(expert, num_experts)  # dropped slots sort last, unused
        table = block_table(counts[1:], T * S)
        row_token = torch.div(order, S, rounding_mode="floor")
        return Dispatched(x, order, counts, T, S, table=table, row_token=row_token)

    def run(self, experts: ExpertBank, d: Dispatched) -> torch.Tensor:
        return experts.run_triton(d)

    def combine(self, y_slots: torch.Tensor, d: Dispatched, weight: torch.Tensor) -> torch.Tensor:
        return weighted_sum(y_slots, weight)  # the second GEMM already wrote slot order


def triton_supported(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    from moe_cli.moe.triton_gemm import interpreting, triton_importable

    return triton_importable() and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


DISPATCHERS: dict[str, Dispatcher] = {"loop": LoopDispatcher(), "grouped": GroupedDispatcher(),
                                      "triton": TritonDispatcher()}


def dispatch(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, bank: ExpertBank,
             impl: str = "loop") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``bank`` on ``x`` routed by (expert, weight) with the dispatcher named ``impl``: (y, counts (E,))."""
    probs = torch.empty(0)
    return DISPATCHERS[impl](x, Routing(expert, weight, probs, probs), bank)
