"""Auxiliary MoE losses: Switch load balance, ST-MoE router z-loss."""

from __future__ import annotations

import torch

from moe_cli.moe.routing import Routing


def load_balance_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch load balance N * sum_i f_i * P_i; f_i = share of kept (token, slot) pairs sent to expert i."""
    kept = routing.expert[routing.expert >= 0]
    counts = torch.bincount(kept, minlength=num_experts).float()
    frac = counts / routing.expert.numel()
    return num_experts * (frac * routing.probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(g(x))^2): keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()
