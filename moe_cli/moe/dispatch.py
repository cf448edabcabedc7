"""Expert dispatch: sort (token, slot) pairs by expert, gather, run each expert, un-permute, combine."""

from __future__ import annotations

from collections.abc import Callable

import torch


def dispatch(
    x: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    num_experts: int,
    run_experts: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute sum_s weight[t, s] * f_{expert[t, s]}(x[t]); slots with expert -1 contribute nothing.

    ``run_experts(x_sorted, counts)`` evaluates expert e on its contiguous run of ``counts[e]`` rows.
    Returns the output (T, D_out) and the per-expert token counts (E,).
    """
    T, S = expert.shape
    flat = expert.reshape(-1)
    order = torch.argsort(flat, stable=True)  # dropped slots (-1) sort first
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)
    count_list = counts.tolist()
    slots = order[count_list[0]:]
    x_sorted = x.index_select(0, torch.div(slots, S, rounding_mode="floor"))
    y_sorted = run_experts(x_sorted, count_list[1:])
    y_sorted = y_sorted * weight.reshape(-1).index_select(0, slots).unsqueeze(-1).to(y_sorted.dtype)
    out = y_sorted.new_zeros(T * S, y_sorted.shape[-1]).index_copy(0, slots, y_sorted)
    return out.view(T, S, -1).sum(dim=1), counts[1:]
