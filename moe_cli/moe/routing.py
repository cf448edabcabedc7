"""Gate math: turn router logits into (token, slot) -> expert assignments with combine weights.

Every router returns a :class:`Routing` in one layout: ``expert`` and ``weight`` of shape (T, S), one row per
token and S slots per token; a slot whose expert is -1 is dropped (the token's residual passes through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    expert: torch.Tensor  # (T, S) long, -1 = dropped slot
    weight: torch.Tensor  # (T, S) fp32 combine weight (0 for dropped slots)
    probs: torch.Tensor  # (T, E) fp32 affinities over all experts (softmax; normalised sigmoid), for aux losses
    logits: torch.Tensor  # (T, E) fp32 router logits
    chosen: torch.Tensor | None = None  # (T, S) the router's choices before a capacity limit dropped any (None: expert)

    @property
    def choices(self) -> torch.Tensor:
        """(T, S) experts the router chose, counting those a capacity limit then dropped (-1: no choice)."""
        return self.expert if self.chosen is None else self.chosen


def capacity(capacity_factor: float, tokens: int, num_experts: int, k: int = 1) -> int:
    """C = ceil(cf * k * T / N) tokens per expert."""
    return max(1, math.ceil(capacity_factor * k * tokens / num_experts))


def top_k(logits: torch.Tensor, k: int, normalize: bool = True, bias: torch.Tensor | None = None) -> Routing:
    """Token-choice top-k: softmax over the k kept logits, or top-k of the full softmax if not normalize.
    ``bias`` (E,) shifts which experts are selected only (aux-loss-free balancing); weights use the raw logits."""
    probs = logits.softmax(dim=-1)
    expert = (logits if bias is None else logits + bias).topk(k, dim=-1).indices
    top_logits = logits.gather(-1, expert)
    weight = top_logits.softmax(dim=-1) if normalize else probs.gather(-1, expert)
    return Routing(expert=expert, weight=weight, probs=probs, logits=logits)


def sigmoid_top_k(logits: torch.Tensor, k: int, normalize: bool = True, scale: float = 1.0,
                  bias: torch.Tensor | None = None) -> Routing:
    """DeepSeek-V3: affinities s = sigmoid(logits); each token takes the k experts with the highest s (+ ``bias``
    when balancing without aux loss); weights are the chosen s, normalised to sum to 1 (``normalize``), times
    ``scale``. ``probs`` (for the load-balance loss and statistics) are s normalised over all experts."""
    scores = logits.sigmoid()
    expert = (scores if bias is None else scores + bias).topk(k, dim=-1).indices
    weight = scores.gather(-1, expert)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(expert=expert, weight=weight * scale, probs=probs, logits=logits)


def apply_capacity(r: Routing, capacity_factor: float, priority: str = "slot") -> Routing:
    """Drop the (token, slot) pairs that overflow C = ceil(cf * k * T / N) per expert.

    Pairs claim places slot by slot (all first choices before any second choice); within a slot, tokens go in
    order (``slot``) or by their top gate weight, highest first (``score``: Batch Prioritized Routing)."""
    T, k = r.expert.shape
    E = r.probs.shape[-1]
    cap = capacity(capacity_factor, T, E, k)
    if priority == "score":
        token_order = torch.argsort(r.weight[:, 0], descending=True, stable=True)
    else:
        token_order = torch.arange(T, device=r.expert.device)
    # queue of pairs in priority order: slot-major, then token_order
    queue_expert = r.expert[token_order].t().reshape(-1)  # (k*T,)
    one_hot = torch.nn.functional.one_hot(queue_expert, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each pair in its expert's queue
    keep_queue = position < cap
    keep = torch.empty_like(keep_queue)
    pair_index = (torch.arange(k, device=r.expert.device)[:, None] * T + token_order[None, :]).reshape(-1)
    keep[pair_index] = keep_queue  # back to (slot, token) order
    keep = keep.reshape(k, T).t().contiguous()
    return Routing(expert=torch.where(keep, r.expert, -1), weight=torch.where(keep, r.weight, 0.0),
                   probs=r.probs, logits=r.logits, chosen=r.choices)


def expert_choice(logits: torch.Tensor, capacity_factor: float = 1.0) -> Routing:
    """Each expert takes its top C = ceil(cf * T / N) tokens by softmax score; slots are (T, E)."""
    T, E = logits.shape
    probs = logits.softmax(dim=-1)
    cap = min(T, capacity(capacity_factor, T, E))
    top_tokens = probs.topk(cap, dim=0).indices  # (C, E)
    chosen = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    chosen.scatter_(0, top_tokens, True)
    experts = torch.arange(E, device=logits.device).expand(T, E)
    return Routing(expert=torch.where(chosen, experts, -1), weight=torch.where(chosen, probs, 0.0),
                   probs=probs, logits=logits)


def soft(logits: torch.Tensor, noisy: torch.Tensor | None = None) -> Routing:
    """Dense gate: softmax(g(x) + eps) over all experts (``noisy`` = g(x) + eps in training), every expert
    evaluated for every token; ``logits`` stay the clean ones (z-loss)."""
    probs = (logits if noisy is None else noisy).softmax(dim=-1)
    T, E = logits.shape
    expert = torch.arange(E, device=logits.device).expand(T, E)
    return Routing(expert=expert, weight=probs, probs=probs, logits=logits)



def top_p(logits: torch.Tensor, p: float, k: int, normalize: bool = True, bias: torch.Tensor | None = None) -> Routing:
    """Adaptive: each token goes to the fewest of its top experts whose probabilities add up to ``p`` (at least
    one, at most ``k``); slots beyond are dropped (-1). Weights renormalised over the kept experts (or raw).
    ``bias`` orders the candidates only (aux-loss-free balancing)."""
    probs = logits.softmax(dim=-1)
    expert = (probs if bias is None else probs + bias).topk(k, dim=-1).indices
    top = probs.gather(-1, expert)
    before = top.cumsum(-1) - top  # mass of the higher-ranked experts
    keep = before < p
    keep[:, 0] = True
    weight = torch.where(keep, top, 0.0)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return Routing(expert=torch.where(keep, expert, -1), weight=weight, probs=probs, logits=logits)


def unit_weights(r: Routing) -> Routing:
    """``combine: sum``: every routed slot weighs exactly 1 in value, with the router's probability's gradient
    (1 + p - p.detach()), so the router still learns."""
    w = torch.where(r.expert >= 0, 1.0 + r.weight - r.weight.detach(), 0.0)
    return Routing(r.expert, w, r.probs, r.logits, r.chosen)
