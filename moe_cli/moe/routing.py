"""Routers: turn router logits into (token, slot) -> expert assignments with combine weights.

Every router returns a :class:`Routing` in one layout: ``expert`` and ``weight`` of shape (T, S), one row per
token and S slots per token; a slot whose expert is -1 is dropped (the token's residual passes through).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATES = ("topk", "soft")


@dataclass
class Routing:
    expert: torch.Tensor  # (T, S) long, -1 = dropped slot
    weight: torch.Tensor  # (T, S) fp32 combine weight (0 for dropped slots)
    probs: torch.Tensor  # (T, E) fp32 softmax over all experts, for aux losses and statistics
    logits: torch.Tensor  # (T, E) fp32 router logits


def top_k(logits: torch.Tensor, k: int, normalize: bool = True) -> Routing:
    """Token-choice top-k: softmax over the k kept logits, or top-k of the full softmax if not normalize."""
    probs = logits.softmax(dim=-1)
    top_logits, expert = logits.topk(k, dim=-1)
    weight = top_logits.softmax(dim=-1) if normalize else probs.gather(-1, expert)
    return Routing(expert=expert, weight=weight, probs=probs, logits=logits)


def soft(logits: torch.Tensor, noise_std: float = 0.0, training: bool = False) -> Routing:
    """Dense gate: softmax(g(x) + eps) over all experts, every expert evaluated for every token."""
    noisy = logits + noise_std * torch.randn_like(logits) if (training and noise_std > 0) else logits
    probs = noisy.softmax(dim=-1)
    T, E = logits.shape
    expert = torch.arange(E, device=logits.device).expand(T, E)
    return Routing(expert=expert, weight=probs, probs=probs, logits=logits)


def route(logits: torch.Tensor, gate: str, k: int, normalize: bool = True, noise_std: float = 0.0,
          training: bool = False) -> Routing:
    """Dispatch to the router named by ``gate``."""
    if gate == "topk":
        return top_k(logits, k, normalize)
    if gate == "soft":
        return soft(logits, noise_std, training)
    raise ValueError(f"unknown gate {gate!r}")
