"""Auxiliary MoE losses: Switch load balance, ST-MoE router z-loss, router distillation, the inverse-CV losses."""

from __future__ import annotations

import torch

from moe_cli.moe.routing import Routing


def load_balance_loss(routing: Routing, num_experts: int, choice_counts: torch.Tensor) -> torch.Tensor:
    """Switch load balance N * sum_i f_i * P_i (Switch Transformers, GShard, V-MoE): f_i = share of the router's
    (token, slot) choices that go to expert i, counted BEFORE a capacity limit drops any (``choice_counts`` (E,),
    the counts of ``routing.choices``; so an overflowing expert's share is not capped at C/T, and the loss pushes
    hardest exactly when an expert overflows); P_i = mean router probability of expert i."""
    frac = choice_counts.float() / routing.choices.numel()
    return num_experts * (frac * routing.probs.mean(dim=0)).sum()


def distill_loss(tokens: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher x) || softmax(router logits)) per token, batch mean: a router learning to reproduce a
    frozen one (dense-to-sparse stage 2)."""
    with torch.autocast(device_type=tokens.device.type, enabled=False), torch.no_grad():
        target = torch.log_softmax(tokens.float() @ teacher.float().T, dim=-1)
    return torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True,
                                      reduction="batchmean")


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(g(x))^2): keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def token_cv_loss(gate: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Per-token inverse CV', mean over tokens of mean(G(x)) / (var(G(x)) + eps), var over the E experts
    (population variance). Minimising it pushes each token's gate toward one-hot."""
    g = gate.reshape(-1, gate.shape[-1])
    return (g.mean(-1) / (g.var(-1, unbiased=False) + eps)).mean()


def expert_usage(gate: torch.Tensor) -> torch.Tensor:
    """s_{b,i}: the gate mass each image b gives expert i, summed over its tokens; gate is (B, N, E)."""
    return gate.sum(dim=1)


def expert_cv_loss(gate: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Per-expert inverse CV', mean_i of mean_b(s_bi) / (var_b(s_bi) + eps): rewards experts whose use
    varies across the images of a batch (population variance over b)."""
    s = expert_usage(gate)
    return (s.mean(0) / (s.var(0, unbiased=False) + eps)).mean()


def batch_variation(gate: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Reported batch-wise variation: mean_i of var_b(s_bi) / (mean_b(s_bi) + eps)."""
    s = expert_usage(gate)
    return (s.var(0, unbiased=False) / (s.mean(0) + eps)).mean()
