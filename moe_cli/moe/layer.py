"""MoEMlp: a drop-in Mixture-of-Experts replacement for timm's Mlp / GluMlp / SwiGLU."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.moe.dispatch import IMPLS, dispatch, grouped_supported
from moe_cli.moe.losses import load_balance_loss, z_loss
from moe_cli.moe.routing import GATES, PRIORITIES, Routing, route

ROUTER_STD = 0.02


class Experts(nn.Module):
    """N FFN experts as stacked weights: w1 (E,H,D) b1 (E,H) [wg bg for GLU] [norm_w norm_b] w2 (E,Do,H) b2 (E,Do).

    GLU experts compute act(x wg + bg) * (x w1 + b1); plain experts act(x w1 + b1).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int,
                 act: nn.Module, glu: bool = False, bias: tuple[bool, bool] = (True, True),
                 norm_eps: float | None = None, drop: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        E, D, H, Do = num_experts, in_features, hidden_features, out_features
        self.num_experts, self.glu, self.norm_eps, self.drop = E, glu, norm_eps, drop
        self.act = act
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.b1 = nn.Parameter(torch.zeros(E, H)) if bias[0] else None
        self.wg = nn.Parameter(torch.empty(E, H, D)) if glu else None
        self.bg = nn.Parameter(torch.zeros(E, H)) if glu and bias[0] else None
        self.norm_w = nn.Parameter(torch.ones(E, H)) if norm_eps is not None else None
        self.norm_b = nn.Parameter(torch.zeros(E, H)) if norm_eps is not None else None
        self.w2 = nn.Parameter(torch.empty(E, Do, H))
        self.b2 = nn.Parameter(torch.zeros(E, Do)) if bias[1] else None
        for w in (self.w1, self.wg, self.w2):
            if w is not None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def _per_expert(self, name: str) -> tuple[torch.Tensor | None, ...]:
        p = getattr(self, name)
        return p.unbind(0) if p is not None else (None,) * self.num_experts

    def forward_expert(self, x: torch.Tensor, w1, b1, wg, bg, nw, nb, w2, b2) -> torch.Tensor:
        h = F.linear(x, w1, b1)
        h = self.act(F.linear(x, wg, bg)) * h if self.glu else self.act(h)
        h = F.dropout(h, self.drop[0], self.training)
        if self.norm_eps is not None:
            h = F.layer_norm(h, h.shape[-1:], nw, nb, self.norm_eps)
        return F.dropout(F.linear(h, w2, b2), self.drop[1], self.training)

    def run_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run expert e on the e-th contiguous chunk of ``x_sorted`` (``counts[e]`` rows), one F.linear each."""
        names = ("w1", "b1", "wg", "bg", "norm_w", "norm_b", "w2", "b2")
        # unbind once: its backward stacks the per-expert grads in one allocation
        params = list(zip(*(self._per_expert(n) for n in names), strict=True))
        chunks = x_sorted.split(counts)
        outs = [self.forward_expert(chunk, *params[e]) for e, chunk in enumerate(chunks) if counts[e] > 0]
        if not outs:
            return x_sorted.new_zeros(0, self.w2.shape[1])
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def run_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped GEMMs (``F.grouped_mm``) over rows sorted by expert; bf16 on CUDA."""
        dtype = torch.get_autocast_dtype(x_sorted.device.type) if torch.is_autocast_enabled(x_sorted.device.type) \
            else x_sorted.dtype
        offs = counts.cumsum(0).to(torch.int32)
        x = x_sorted.to(dtype)

        def gmm(inp, w, b):
            y = F.grouped_mm(inp, w.to(dtype).transpose(-2, -1), offs=offs)
            return y + b.to(dtype).index_select(0, row_expert) if b is not None else y

        h = gmm(x, self.w1, self.b1)
        h = self.act(gmm(x, self.wg, self.bg)) * h if self.glu else self.act(h)
        h = F.dropout(h, self.drop[0], self.training)
        if self.norm_eps is not None:
            h = F.layer_norm(h, h.shape[-1:], None, None, self.norm_eps)
            nw, nb = self.norm_w.to(dtype), self.norm_b.to(dtype)
            h = h * nw.index_select(0, row_expert) + nb.index_select(0, row_expert)
        return F.dropout(gmm(h.to(dtype), self.w2, self.b2), self.drop[1], self.training)


class MoEMlp(nn.Module):
    """Mixture-of-Experts FFN with the forward signature of timm's Mlp: tensor in, tensor out.

    The router runs in fp32. Aux losses of the last forward are kept in ``self.aux_losses`` and routing
    statistics in ``self.last_counts`` for the training loop to collect.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 num_experts: int = 4, k: int = 2, act: nn.Module | None = None, glu: bool = False,
                 bias: tuple[bool, bool] = (True, True), norm_eps: float | None = None,
                 drop: tuple[float, float] = (0.0, 0.0), gate: str = "topk", normalize: bool = True,
                 noise_std: float = 0.0, channels_first: bool = False, router_std: float = ROUTER_STD,
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
                 priority: str = "slot", impl: str = "auto"):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if gate == "topk" and not 1 <= k <= num_experts:
            raise ValueError(f"k must be between 1 and num_experts={num_experts}, got {k}")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for cf in (capacity_factor, eval_capacity_factor):
            if cf is not None and cf <= 0:
                raise ValueError(f"capacity factors must be > 0, got {cf}")
        out_features = out_features or in_features
        self.num_experts, self.k, self.gate, self.normalize = num_experts, k, gate, normalize
        self.noise_std, self.channels_first = noise_std, channels_first
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.priority, self.impl = priority, impl
        self.router = nn.Linear(in_features, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=router_std)
        self.experts = Experts(num_experts, in_features, hidden_features, out_features,
                               act if act is not None else nn.GELU(), glu, bias, norm_eps, drop)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_counts: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None
        self.disabled_experts: set[int] = set()
        # frozen router to distil from (dense-to-sparse stage 2); non-persistent, so never in checkpoints
        self.register_buffer("teacher_weight", None, persistent=False)

    @property
    def active_experts(self) -> int:
        enabled = self.num_experts - len(self.disabled_experts)
        if self.gate == "soft":
            return enabled
        if self.gate == "expert_choice":  # each expert takes cf * T / N tokens: cf experts per token on average
            return min(enabled, (self.current_capacity_factor or 1.0) * enabled / self.num_experts)
        return min(self.k, enabled)

    @property
    def current_capacity_factor(self) -> float | None:
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def resolve_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        ex = self.experts
        dims = (ex.w1.shape[1], ex.w1.shape[2], ex.w2.shape[1])
        amp_bf16 = torch.is_autocast_enabled(x.device.type) and \
            torch.get_autocast_dtype(x.device.type) == torch.bfloat16
        return "grouped" if (x.dtype == torch.bfloat16 or amp_bf16) and grouped_supported(x, dims) else "loop"

    def route(self, tokens: torch.Tensor) -> Routing:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())
        if self.disabled_experts:
            off = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            off[list(self.disabled_experts)] = True
            logits = logits.masked_fill(off, float("-inf"))
        r = route(logits, self.gate, self.k, self.normalize, self.noise_std, self.training,
                  self.current_capacity_factor, self.priority)
        if self.disabled_experts:  # soft and expert-choice gates list every expert: drop the disabled ones
            dead = off[r.expert.clamp(min=0)] & (r.expert >= 0)
            r = Routing(torch.where(dead, -1, r.expert), torch.where(dead, 0.0, r.weight), r.probs, r.logits)
        return r

    def disable_experts(self, experts: set[int]) -> None:
        """Switch experts off at inference: -inf router logits, so no token is sent to them."""
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert {bad[0]} does not exist (the layer has {self.num_experts})")
        enabled = self.num_experts - len(set(experts))
        if enabled < 1 or (self.gate == "topk" and enabled < self.k):
            raise ValueError(f"disabling {sorted(experts)} leaves {enabled} expert(s), fewer than k={self.k}")
        self.disabled_experts = set(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.route(tokens)
        y, counts = dispatch(tokens, routing.expert, routing.weight, self.experts, self.resolve_impl(tokens))
        self.aux_losses = {"load_balance": load_balance_loss(routing, self.num_experts, counts),
                           "z_loss": z_loss(routing.logits)}
        if self.teacher_weight is not None:
            self.aux_losses["distill"] = self._distill_loss(tokens, routing.logits)
        self.last_counts = counts.detach()
        self.last_dropped = dropped_fraction(routing)
        # per-token gate weights as a (batch, tokens, E) matrix, for the CV losses and routing statistics
        self.last_gate = gate_matrix(routing, self.num_experts).view(lead[0] if lead else 1, -1, self.num_experts)
        y = y.reshape(*lead, y.shape[-1])
        return y.movedim(-1, 1) if self.channels_first else y

    def set_teacher(self, weight: torch.Tensor | None) -> None:
        """Distil this router toward a frozen one: aux loss `distill` = KL(softmax(teacher x) || softmax(router x))."""
        self.teacher_weight = None if weight is None else weight.detach().clone().float()

    def _distill_loss(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False), torch.no_grad():
            target = F.log_softmax(F.linear(tokens.float(), self.teacher_weight), dim=-1)
        return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")

    def extra_repr(self) -> str:
        cf = f", capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, " \
            f"priority={self.priority}" if self.capacity_factor or self.eval_capacity_factor else ""
        return f"num_experts={self.num_experts}, k={self.k}, gate={self.gate}, normalize={self.normalize}{cf}"

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, k: int, noise_std: float = 0.0,
                   generator: torch.Generator | None = None, **kwargs) -> MoEMlp:
        """Upcycle a dense timm FFN: every expert a copy of it (plus optional N(0, noise_std) noise)."""
        spec = dense_spec(mlp)
        moe = cls(spec["in_features"], spec["hidden_features"], spec["out_features"], num_experts, k,
                  act=copy.deepcopy(mlp.act), glu=spec["glu"], bias=spec["bias"], norm_eps=spec["norm_eps"],
                  drop=spec["drop"], channels_first=spec["channels_first"], **kwargs)
        with torch.no_grad():
            if generator is not None:
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator) * ROUTER_STD)
            for name, tensor in spec["weights"].items():
                param = getattr(moe.experts, name)
                param.copy_(tensor.to(param.dtype).unsqueeze(0).expand_as(param))
                if noise_std > 0 and name in ("w1", "wg", "w2"):
                    noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                    param.add_(noise.to(param.device) * noise_std)
        return moe.to(device=spec["device"])


def dropped_fraction(routing: Routing) -> torch.Tensor:
    """Share of tokens left without any expert (their residual passes through unchanged)."""
    return (routing.expert < 0).all(dim=-1).float().mean().detach()


def gate_matrix(routing: Routing, num_experts: int) -> torch.Tensor:
    """(T, E) combine weights: row t holds the weight each expert's output gets for token t (0 if not routed)."""
    keep = routing.expert >= 0
    index = routing.expert.clamp(min=0)
    weight = torch.where(keep, routing.weight, torch.zeros_like(routing.weight))
    return weight.new_zeros(routing.expert.shape[0], num_experts).scatter_add(1, index, weight)


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    return w.flatten(1) if w.dim() == 4 else w  # 1x1 conv -> linear


def dense_spec(mlp: nn.Module) -> dict:
    """Read the shapes and weights of a timm Mlp / GluMlp / SwiGLU (or any fc1-act-fc2 module)."""
    kind = type(mlp).__name__
    fc2 = mlp.fc2
    channels_first = isinstance(fc2, nn.Conv2d)
    if hasattr(mlp, "fc1_g"):  # SwiGLU: act(fc1_g x) * fc1_x x
        w1, b1 = _linear_weight(mlp.fc1_x), mlp.fc1_x.bias
        wg, bg = _linear_weight(mlp.fc1_g), mlp.fc1_g.bias
    elif hasattr(mlp, "gate_last"):  # GluMlp: fc1 output chunked in two halves, one is the gate
        w, b = _linear_weight(mlp.fc1), mlp.fc1.bias
        (wa, wb), (ba, bb) = w.chunk(2, 0), (b.chunk(2, 0) if b is not None else (None, None))
        (w1, b1, wg, bg) = (wa, ba, wb, bb) if mlp.gate_last else (wb, bb, wa, ba)
    else:
        w1, b1, wg, bg = _linear_weight(mlp.fc1), mlp.fc1.bias, None, None
    norm = getattr(mlp, "norm", None)
    if norm is None or isinstance(norm, nn.Identity):
        norm_eps, norm_w, norm_b = None, None, None
    elif isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        norm_eps, norm_w, norm_b = norm.eps, norm.weight, norm.bias
    else:
        raise ValueError(f"{kind}: hidden norm {type(norm).__name__} is not supported (LayerNorm or none)")
    weights = {"w1": w1, "b1": b1, "wg": wg, "bg": bg, "norm_w": norm_w, "norm_b": norm_b,
               "w2": _linear_weight(fc2), "b2": fc2.bias}
    drop1, drop2 = getattr(mlp, "drop1", None), getattr(mlp, "drop2", None)
    return {
        "in_features": w1.shape[1], "hidden_features": w1.shape[0], "out_features": fc2.weight.shape[0],
        "glu": wg is not None, "bias": (b1 is not None, fc2.bias is not None), "norm_eps": norm_eps,
        "drop": (getattr(drop1, "p", 0.0), getattr(drop2, "p", 0.0)), "channels_first": channels_first,
        "device": w1.device, "weights": {k: v.detach() for k, v in weights.items() if v is not None},
    }
