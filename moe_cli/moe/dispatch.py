"""Expert dispatch: sort (token, slot) pairs by expert, gather, run the experts, un-permute, combine.

Two ways to run the experts over the sorted rows, one layout: a loop of ``F.linear`` per expert (any device,
the CPU default) and ``F.grouped_mm`` (CUDA bf16; also runs on CPU). Results are gathered back into slot order
and each token's slots are combined by one batched matmul: deterministic, no ``index_add_``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

IMPLS = ("auto", "loop", "grouped")


class ExpertBank(Protocol):
    num_experts: int

    def run_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor: ...
    def run_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor: ...


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


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def dispatch(x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, bank: ExpertBank,
             impl: str = "loop") -> tuple[torch.Tensor, torch.Tensor]:
    """y[t] = sum_s weight[t, s] * f_{expert[t, s]}(x[t]); slots with expert -1 contribute nothing.

    Returns y (T, D_out) and the per-expert slot counts (E,)."""
    T, S = expert.shape
    E = bank.num_experts
    flat = expert.reshape(-1)
    counts = expert_counts(expert, E)
    if impl == "grouped":
        # dropped slots sort last (key E) and ride along in the last expert's group, so no host sync is needed
        # to cut them off; their outputs are zeroed before the combine, so they get no gradient either
        key = torch.where(flat < 0, E, flat)
        order = torch.argsort(key, stable=True)
        row_expert = key.index_select(0, order)
        x_sorted = x.index_select(0, torch.div(order, S, rounding_mode="floor"))
        group_sizes = counts[1:].clone()
        group_sizes[-1] += counts[0]
        y_sorted = bank.run_grouped(x_sorted, group_sizes, row_expert.clamp(max=E - 1))
        y_sorted = torch.where(row_expert.unsqueeze(-1) < E, y_sorted, 0.0)
        y_slots = y_sorted.index_select(0, inverse_permutation(order))
    else:
        order = torch.argsort(flat, stable=True)  # dropped slots (-1) sort first
        count_list = counts.tolist()
        slots = order[count_list[0]:]
        x_sorted = x.index_select(0, torch.div(slots, S, rounding_mode="floor"))
        y_sorted = bank.run_loop(x_sorted, count_list[1:])
        if count_list[0]:
            y_slots = y_sorted.new_zeros(T * S, y_sorted.shape[-1]).index_copy(0, slots, y_sorted)
        else:
            y_slots = y_sorted.index_select(0, inverse_permutation(order))
    # weighted sum over each token's slots as one batched matmul: (T, 1, S) @ (T, S, D)
    out = torch.bmm(weight.to(y_slots.dtype).unsqueeze(1), y_slots.view(T, S, -1)).squeeze(1)
    return out, counts[1:]
