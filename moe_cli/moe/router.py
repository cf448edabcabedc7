"""Routers: a linear map to one logit per expert (in fp32), then a gate that turns logits into a :class:`Routing`.

One class per gate, all with the same parameter (``weight``, (E, D), the ``router.weight`` of checkpoints):
:class:`TopKRouter` (token choice, optional capacity), :class:`TopPRouter`, :class:`SoftRouter` (every expert)
and :class:`ExpertChoiceRouter` (each expert picks its tokens). :func:`make_router` picks the class from a
:class:`~moe_cli.moe.config.MoEConfig`; experts it switches off (``disabled``) get -inf logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.moe.config import ROUTER_STD, Balance, MoEConfig
from moe_cli.moe.routing import (
    Routing,
    apply_capacity,
    expert_choice,
    sigmoid_top_k,
    soft,
    top_k,
    top_p,
    unit_weights,
)


class Router(nn.Module):
    """logits = x W^T in fp32 (autocast off), experts switched off by -inf, then :meth:`gate`."""

    def __init__(self, in_features: int, cfg: MoEConfig, std: float = ROUTER_STD, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.experts, in_features, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=std)
        if cfg.balance == Balance.aux_free:  # DeepSeek-V3 selection bias, saved with the model
            self.register_buffer("expert_bias", torch.zeros(cfg.experts, device=device, dtype=torch.float32))

    @property
    def capacity_factor(self) -> float | None:
        if not self.training and self.cfg.eval_capacity_factor is not None:
            return self.cfg.eval_capacity_factor
        return self.cfg.capacity_factor

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return F.linear(tokens.float(), self.weight.float())

    def forward(self, tokens: torch.Tensor) -> Routing:
        r = self._route(self.logits(tokens))
        return unit_weights(r) if self.cfg.combine == "sum" else r

    def _route(self, logits: torch.Tensor) -> Routing:
        if not self.cfg.disabled:
            return self.gate(logits)
        off = torch.zeros(self.cfg.experts, dtype=torch.bool, device=logits.device)
        off[list(self.cfg.disabled)] = True
        r = self.gate(logits.masked_fill(off, float("-inf")))
        # soft and expert-choice gates list every expert: drop the disabled ones
        dead = off[r.expert.clamp(min=0)] & (r.expert >= 0)
        return Routing(torch.where(dead, -1, r.expert), torch.where(dead, 0.0, r.weight), r.probs, r.logits)

    def gate(self, logits: torch.Tensor) -> Routing:
        raise NotImplementedError

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """The aux-loss-free balancing bias (E,) added to the scores when choosing experts, or None."""
        return getattr(self, "expert_bias", None)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """bias_i += u * sign(mean load - load_i) from this step's (token, slot) counts per expert, on the device
        (no host sync): under-loaded experts become more likely to be chosen."""
        load = counts.float()
        self.expert_bias.add_(self.cfg.bias_update * torch.sign(load.mean() - load))

    def noisy(self, logits: torch.Tensor) -> torch.Tensor:
        std = self.cfg.router_noise
        return logits + std * torch.randn_like(logits) if (self.training and std > 0) else logits

    def extra_repr(self) -> str:
        c = self.cfg
        cf = f", capacity_factor={c.capacity_factor}, eval_capacity_factor={c.eval_capacity_factor}, " \
            f"priority={c.priority}" if c.capacity_factor or c.eval_capacity_factor else ""
        return f"in_features={self.weight.shape[1]}, experts={c.experts}{cf}"


class TopKRouter(Router):
    """Token choice: each token goes to its k highest-scoring experts; with a capacity factor, overflow drops."""

    def gate(self, logits: torch.Tensor) -> Routing:
        r = self.choose(self.noisy(logits))
        cf = self.capacity_factor
        return apply_capacity(r, cf, self.cfg.priority) if cf is not None else r

    def choose(self, logits: torch.Tensor) -> Routing:
        return top_k(logits, self.cfg.k, self.cfg.normalize, self.selection_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.cfg.k}, normalize={self.cfg.normalize}"


class SigmoidTopKRouter(TopKRouter):
    """DeepSeek-V3 token choice: sigmoid affinities, top-k selection, weights normalised over the chosen experts
    and multiplied by ``route_scale``; capacity as top-k."""

    def choose(self, logits: torch.Tensor) -> Routing:
        return sigmoid_top_k(logits, self.cfg.k, self.cfg.normalize, self.cfg.route_scale, self.selection_bias)


class TopPRouter(Router):
    """Adaptive token choice: the fewest experts (1..k) whose probabilities reach ``top_p``."""

    def gate(self, logits: torch.Tensor) -> Routing:
        return top_p(self.noisy(logits), self.cfg.top_p, self.cfg.k, self.cfg.normalize, self.selection_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.cfg.top_p}, k={self.cfg.k}"


class SoftRouter(Router):
    """Dense gate: softmax(g(x) + eps) over every expert."""

    def gate(self, logits: torch.Tensor) -> Routing:
        return soft(logits, self.noisy(logits))


class ExpertChoiceRouter(Router):
    """Each expert takes its top C = ceil(cf * T / N) tokens (cf default 1)."""

    def gate(self, logits: torch.Tensor) -> Routing:
        cf = self.capacity_factor
        return expert_choice(logits, cf if cf is not None else 1.0)


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "sigmoid_topk": SigmoidTopKRouter, "top_p": TopPRouter,
                                    "soft": SoftRouter, "expert_choice": ExpertChoiceRouter}


def make_router(in_features: int, cfg: MoEConfig, like: Router | None = None, **kwargs) -> Router:
    """The router class for ``cfg.gate``; with ``like``, it takes over that router's weight (changing the gate or
    k of a trained layer)."""
    router = ROUTERS[cfg.gate](in_features, cfg, **kwargs)
    if like is not None:
        router.weight = like.weight
        if router.selection_bias is not None and like.selection_bias is not None:
            router.expert_bias = like.expert_bias
        router.to(like.weight.device)
        router.train(like.training)
    return router
