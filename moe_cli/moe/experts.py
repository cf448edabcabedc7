"""The expert bank: E FFN experts as stacked weights, run over rows grouped by expert.

One forward for every dispatcher: ``experts(x_RD, plan)``. The FFN itself (GLU, activation, dropout, hidden
LayerNorm) is written once, :meth:`Experts.ffn`, over ``ops`` that run its linear maps; the dispatcher's ``plan``
applies it: expert by expert with plain ``F.linear`` (loop), or once over all rows with grouped GEMMs as the
ops (grouped, Triton).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn

from moe_cli.moe.dispatch import Ops, Plan, per_expert

PARAMS = ("w1", "b1", "wg", "bg", "norm_w", "norm_b", "w2", "b2")  # every stacked tensor an expert bank may hold


class Experts(nn.Module):
    """N FFN experts as stacked weights: w1 (E,H,D) b1 (E,H) [wg bg for GLU] [norm_w norm_b] w2 (E,O,H) b2 (E,O).

    GLU experts compute act(x wg + bg) * (x w1 + b1); plain experts act(x w1 + b1).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int,
                 act_layer: Callable[[], nn.Module] = nn.GELU, glu: bool = False, bias: bool | tuple = True,
                 norm_eps: float | None = None, drop: float | tuple = 0.0, device=None, dtype=None):
        super().__init__()
        E, D, H, O = num_experts, in_features, hidden_features, out_features  # noqa: E741
        bias, drop = to_2tuple(bias), to_2tuple(drop)
        dd = {"device": device, "dtype": dtype}
        self.glu, self.norm_eps, self.drop = glu, norm_eps, drop
        self.act = act_layer()
        self.w1 = nn.Parameter(torch.empty(E, H, D, **dd))
        self.b1 = nn.Parameter(torch.zeros(E, H, **dd)) if bias[0] else None
        self.wg = nn.Parameter(torch.empty(E, H, D, **dd)) if glu else None
        self.bg = nn.Parameter(torch.zeros(E, H, **dd)) if glu and bias[0] else None
        self.norm_w = nn.Parameter(torch.ones(E, H, **dd)) if norm_eps is not None else None
        self.norm_b = nn.Parameter(torch.zeros(E, H, **dd)) if norm_eps is not None else None
        self.w2 = nn.Parameter(torch.empty(E, O, H, **dd))
        self.b2 = nn.Parameter(torch.zeros(E, O, **dd)) if bias[1] else None
        for w in (self.w1, self.wg, self.w2):
            if w is not None:
                for e in range(E):  # each expert initialised like the nn.Linear it replaces
                    nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def dims(self) -> tuple[int, int, int]:
        """(hidden, in, out) features."""
        return self.w1.shape[1], self.w1.shape[2], self.w2.shape[1]

    def no_weight_decay(self) -> set[str]:
        """Biases and the hidden LayerNorm (stacked, so 2-d) are not decayed."""
        return {n for n in ("b1", "bg", "b2", "norm_w", "norm_b") if getattr(self, n) is not None}

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    @torch.no_grad()
    def select(self, keep: torch.Tensor) -> None:
        """Keep the experts ``keep`` (indices, in that order): every stacked tensor shrinks together. Only the
        owning layer calls this (:meth:`MoEMlp.select_experts`)."""
        for name in PARAMS:
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, nn.Parameter(p.data[keep.to(p.device)].clone(), requires_grad=p.requires_grad))

    def forward(self, x_RD: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The experts over rows grouped by ``plan`` (its dispatcher's): (R, D) -> (R, O). The plan applies
        :meth:`ffn` to the rows: per expert with that expert's weights (loop), or once over all rows with the
        stacked weights and grouped GEMMs."""
        return plan.apply(self.ffn, x_RD, {name: getattr(self, name) for name in PARAMS})

    def dense(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, outputs added (shared experts): (T, D) -> (T, O)."""
        from moe_cli.moe.dispatchers.loop import DENSE

        outs = [self.ffn(x_TD, DENSE, w) for w in per_expert({name: getattr(self, name) for name in PARAMS})]
        return sum(outs[1:], outs[0])

    def ffn(self, x: torch.Tensor, ops: Ops, p: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The expert FFN, written once: ``ops`` runs its linear maps and the hidden norm's affine part."""
        h = ops.linear(x, p["w1"], p["b1"], True)
        h = self.act(ops.linear(x, p["wg"], p["bg"], True)) * h if self.glu else self.act(h)
        h = F.dropout(h, self.drop[0], self.training)
        if self.norm_eps is not None:
            h = ops.scale_shift(F.layer_norm(h, h.shape[-1:], None, None, self.norm_eps), p["norm_w"], p["norm_b"])
        return F.dropout(ops.linear(h, p["w2"], p["b2"], False), self.drop[1], self.training)
