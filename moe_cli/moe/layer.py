"""MoEMlp: a drop-in Mixture-of-Experts replacement for timm's Mlp / GluMlp / SwiGLU, in three parts.

- a :class:`~moe_cli.moe.router.Router` (``layer.router``) turns tokens into a typed ``Routing``;
- a :class:`~moe_cli.moe.dispatch.Dispatcher` groups tokens by expert, runs the experts and combines;
- :class:`Experts` (``layer.experts``) holds the stacked expert weights.

The layer owns one frozen :class:`~moe_cli.moe.config.MoEConfig` (``layer.cfg``); :meth:`MoEMlp.reconfigure`
changes it (validated) and rebuilds the router around the same weights (the dispatcher is picked per
forward). It takes timm's ``mlp_layer`` keywords, so ``timm.create_model('vit_small_patch16_224',
mlp_layer=partial(MoEMlp, num_experts=8, k=2))`` builds an MoE ViT from scratch; :meth:`MoEMlp.from_dense`
upcycles a trained FFN.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.moe.config import ROUTER_STD, MoEConfig
from moe_cli.moe.dispatch import DISPATCHERS, Dispatcher, grouped_supported, triton_supported
from moe_cli.moe.init import expert_weights
from moe_cli.moe.router import Router, make_router
from moe_cli.moe.routing import Routing


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Experts(nn.Module):
    """N FFN experts as stacked weights: w1 (E,H,D) b1 (E,H) [wg bg for GLU] [norm_w norm_b] w2 (E,Do,H) b2 (E,Do).

    GLU experts compute act(x wg + bg) * (x w1 + b1); plain experts act(x w1 + b1).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int,
                 act_layer: Callable[[], nn.Module] = nn.GELU, glu: bool = False, bias: bool | tuple = True,
                 norm_eps: float | None = None, drop: float | tuple = 0.0, device=None, dtype=None):
        super().__init__()
        E, D, H, Do = num_experts, in_features, hidden_features, out_features
        bias, drop = _pair(bias), _pair(drop)
        dd = {"device": device, "dtype": dtype}
        self.num_experts, self.glu, self.norm_eps, self.drop = E, glu, norm_eps, drop
        self.act = act_layer()
        self.w1 = nn.Parameter(torch.empty(E, H, D, **dd))
        self.b1 = nn.Parameter(torch.zeros(E, H, **dd)) if bias[0] else None
        self.wg = nn.Parameter(torch.empty(E, H, D, **dd)) if glu else None
        self.bg = nn.Parameter(torch.zeros(E, H, **dd)) if glu and bias[0] else None
        self.norm_w = nn.Parameter(torch.ones(E, H, **dd)) if norm_eps is not None else None
        self.norm_b = nn.Parameter(torch.zeros(E, H, **dd)) if norm_eps is not None else None
        self.w2 = nn.Parameter(torch.empty(E, Do, H, **dd))
        self.b2 = nn.Parameter(torch.zeros(E, Do, **dd)) if bias[1] else None
        for w in (self.w1, self.wg, self.w2):
            if w is not None:
                for e in range(E):  # each expert initialised like the nn.Linear it replaces
                    nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))

    def no_weight_decay(self) -> set[str]:
        """Biases and the hidden LayerNorm (stacked, so 2-d) are not decayed."""
        return {n for n in ("b1", "bg", "b2", "norm_w", "norm_b") if getattr(self, n) is not None}

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

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _row_affine(self, h: torch.Tensor, row_expert: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-row hidden LayerNorm with the row's expert's scale and shift, gathered by a one-hot matmul (its
        backward is a matmul too: no atomic index_add_ into E rows)."""
        h = F.layer_norm(h, h.shape[-1:], None, None, self.norm_eps)
        one_hot = F.one_hot(row_expert, self.num_experts + 1)[:, :self.num_experts].to(dtype)
        return h * (one_hot @ self.norm_w.to(dtype)) + one_hot @ self.norm_b.to(dtype)

    def run_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped GEMMs (``F.grouped_mm``) over rows sorted by expert; bf16 on CUDA. Biases
        are added by a one-hot matmul, so their gradient is a matmul, not an atomic scatter."""
        dtype = self._compute_dtype(x_sorted)
        offs = counts.cumsum(0).to(torch.int32)
        x = x_sorted.to(dtype)
        one_hot = F.one_hot(row_expert, self.num_experts).to(dtype) if (self.b1 is not None or self.b2 is not None) \
            else None

        def gmm(inp, w, b):
            y = F.grouped_mm(inp, w.to(dtype).transpose(-2, -1), offs=offs)
            return y + one_hot @ b.to(dtype) if b is not None else y

        h = gmm(x, self.w1, self.b1)
        h = self.act(gmm(x, self.wg, self.bg)) * h if self.glu else self.act(h)
        h = F.dropout(h, self.drop[0], self.training)
        if self.norm_eps is not None:
            h = self._row_affine(h, row_expert, dtype)
        return F.dropout(gmm(h.to(dtype), self.w2, self.b2), self.drop[1], self.training)

    def run_triton(self, d) -> torch.Tensor:
        """Both expert GEMMs as Triton scattered GEMMs: token rows gathered inside the first, outputs written
        straight to (token, slot) order by the second (dropped slots stay zero)."""
        from moe_cli.moe.triton_gemm import scatter_linear

        dtype = self._compute_dtype(d.x_sorted)
        x = d.x_sorted.to(dtype)
        rows = d.tokens * d.slots

        def cast(t):
            return t.to(dtype) if t is not None else None

        def first(w, b):
            return scatter_linear(x, cast(w), cast(b), d.table, x_map=d.row_token, out_rows=rows,
                                  x_rows_grad=(d.order, d.slots))

        h = first(self.w1, self.b1)
        h = self.act(first(self.wg, self.bg)) * h if self.glu else self.act(h)
        h = F.dropout(h, self.drop[0], self.training)
        if self.norm_eps is not None:
            ends = d.table.expert_end.long()  # expert of each sorted row (E for the unused dropped rows)
            row_expert = torch.searchsorted(ends, torch.arange(rows, device=h.device), right=True)
            h = self._row_affine(h, row_expert, dtype)
        return F.dropout(scatter_linear(h.to(dtype), cast(self.w2), cast(self.b2), d.table, y_map=d.order,
                                        out_rows=rows), self.drop[1], self.training)


def layer_config(config: MoEConfig | None, num_experts: int | None, k: int | None, moe: dict) -> MoEConfig:
    """``config`` (default MoEConfig()) with the keywords given, validated."""
    given = {n: v for n, v in {"experts": num_experts, "k": k}.items() if v is not None}
    return dataclasses.replace((config or MoEConfig()).routing(), **given, **moe).validate(lambda name: name)


def _norm_eps(norm_layer, hidden: int) -> float | None:
    """timm passes a norm class for the hidden activations; experts support LayerNorm (eps read from it)."""
    if norm_layer is None:
        return None
    norm = norm_layer(hidden)
    if isinstance(norm, nn.Identity):
        return None
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        raise ValueError(f"hidden norm {type(norm).__name__} is not supported by MoE experts (LayerNorm or none)")
    return norm.eps


class MoEMlp(nn.Module):
    """Mixture-of-Experts FFN with the forward signature and constructor keywords of timm's Mlp.

    MoE settings come from ``config`` (a :class:`MoEConfig`), overridden by ``num_experts``, ``k`` and any other
    MoEConfig field given as a keyword (``gate``, ``capacity_factor``, ``impl``, ...). ``glu=True`` makes
    GLU experts (act(x wg) * x w1), as timm's GluMlp / SwiGLU. Aux losses and routing statistics are not kept
    on the layer: collect them with :class:`moe_cli.moe.stats.RoutingRecorder`.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable | None = None,
                 bias: bool | tuple[bool, bool] = True, drop: float | tuple[float, float] = 0.0,
                 use_conv: bool = False, glu: bool = False, num_experts: int | None = None, k: int | None = None,
                 config: MoEConfig | None = None, router_std: float = ROUTER_STD, device=None, dtype=None, **moe):
        super().__init__()
        self.cfg = cfg = layer_config(config, num_experts, k, moe)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.channels_first = use_conv
        self.router: Router = make_router(in_features, cfg, std=router_std, device=device, dtype=dtype)
        self.experts = Experts(cfg.experts, in_features, hidden_features, out_features, act_layer, glu, bias,
                               _norm_eps(norm_layer, hidden_features), drop, device=device, dtype=dtype)
        self.recorders: list = []  # RoutingRecorders collecting this layer's routing (moe_cli.moe.stats)
        self.init_method = "copy"  # how the experts were made from a dense FFN (split experts are smaller)

    # ------------------------------------------------------------------ configuration

    @property
    def num_experts(self) -> int:
        return self.cfg.experts

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def gate(self) -> str:
        return self.cfg.gate

    @property
    def normalize(self) -> bool:
        return self.cfg.normalize

    @property
    def active_experts(self) -> float:
        return self.router.active_experts

    def reconfigure(self, cfg: MoEConfig | None = None, **changes) -> MoEMlp:
        """Switch to ``cfg`` (or the current config with ``changes``), validated; the router is rebuilt for the
        new gate around the same weight. The number of experts cannot change."""
        new = layer_config(cfg or self.cfg, None, None, changes)
        if new.experts != self.cfg.experts:
            raise ValueError(f"experts cannot change from {self.cfg.experts} to {new.experts} (prune instead)")
        self.cfg = new
        self.router = make_router(self.router.weight.shape[1], new, like=self.router)
        return self

    def disable_experts(self, experts: set[int]) -> None:
        """Switch experts off at inference: -inf router logits, so no token is sent to them."""
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert {bad[0]} does not exist (the layer has {self.num_experts})")
        enabled = self.num_experts - len(set(experts))
        if enabled < 1 or (self.gate in ("topk", "top_p") and enabled < self.k):
            raise ValueError(f"disabling {sorted(experts)} leaves {enabled} expert(s), fewer than k={self.k}")
        self.router.disabled = frozenset(experts)

    def set_teacher(self, weight: torch.Tensor | None) -> None:
        """Distil this router toward a frozen one: recorders with aux=True report `distill` = KL(teacher || router)."""
        self.router.teacher_weight = None if weight is None else weight.detach().clone().float()

    def no_weight_decay(self) -> set[str]:
        return {f"experts.{n}" for n in self.experts.no_weight_decay()}

    # ------------------------------------------------------------------ forward

    def dispatcher(self, x: torch.Tensor) -> Dispatcher:
        """The configured dispatcher (``auto``: see :meth:`resolve_impl`)."""
        impl = self.resolve_impl(x)
        if impl == "triton" and not triton_supported(x):
            raise ConfigError(f"impl triton runs on CUDA tensors with Triton installed (or CPU tensors under "
                              f"TRITON_INTERPRET=1); got a {x.device.type} tensor")
        return DISPATCHERS[impl]

    def resolve_impl(self, x: torch.Tensor) -> str:
        """``auto``: on CUDA the Triton kernels (when Triton imports and its self-check passed), else grouped
        GEMMs for bf16 where supported; elsewhere the loop (in 16 bit under torch.compile: grouped GEMMs, which
        trace without a graph break)."""
        if self.cfg.impl != "auto":
            return self.cfg.impl
        ex = self.experts
        dims = (ex.w1.shape[1], ex.w1.shape[2], ex.w2.shape[1])
        if x.is_cuda and triton_ready(x.device):
            return "triton"
        amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if (x.dtype == torch.bfloat16 or amp == torch.bfloat16) and grouped_supported(x, dims):
            return "grouped"
        half = x.dtype in (torch.bfloat16, torch.float16) or amp in (torch.bfloat16, torch.float16)
        # the loop reads group sizes on the host (a graph break under torch.compile); grouped_mm traces in 16 bit
        return "grouped" if torch.compiler.is_compiling() and half and hasattr(F, "grouped_mm") else "loop"

    def route(self, tokens: torch.Tensor) -> Routing:
        return self.router(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        y, counts = self.dispatcher(tokens)(tokens, routing, self.experts)
        for recorder in self.recorders:
            recorder.record(self, tokens, routing, counts, lead[0] if lead else 1)
        y = y.reshape(*lead, y.shape[-1])
        return y.movedim(-1, 1) if self.channels_first else y

    def extra_repr(self) -> str:
        return f"gate={self.cfg.gate}, impl={self.cfg.impl}"

    # ------------------------------------------------------------------ upcycling

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int | None = None, k: int | None = None,
                   noise_std: float = 0.0, generator: torch.Generator | None = None,
                   config: MoEConfig | None = None, init: str = "copy", drop_ratio: float = 0.5,
                   split: str = "cluster", shapes_only: bool = False, **moe) -> MoEMlp:
        """Upcycle a dense timm FFN: experts made by ``init`` (copy: copies of it, plus optional N(0, noise_std)
        noise; drop; split — see moe_cli.moe.init), the router from ``generator`` (random, std 0.02).
        ``shapes_only``: build the layer for loading saved weights, without computing expert weights."""
        spec = dense_spec(mlp)
        act, eps = mlp.act, spec["norm_eps"]
        if init == "split":
            moe = {**moe, "combine": "sum"}
        probe = layer_config(config, num_experts, k, moe)
        hidden = spec["hidden_features"] // probe.experts if init == "split" else spec["hidden_features"]
        layer = cls(spec["in_features"], hidden, spec["out_features"],
                    act_layer=lambda: copy.deepcopy(act), glu=spec["glu"], bias=spec["bias"], drop=spec["drop"],
                    norm_layer=None if eps is None else (lambda h: nn.LayerNorm(h, eps=eps)),
                    use_conv=spec["channels_first"], config=probe)
        layer.init_method = init
        if shapes_only:
            return layer.to(device=spec["device"])
        weights = expert_weights(spec, layer.num_experts, init, noise_std, drop_ratio, split, generator)
        with torch.no_grad():
            if generator is not None:
                weight = layer.router.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * ROUTER_STD)
            for name, tensor in weights.items():
                param = getattr(layer.experts, name)
                param.copy_(tensor.to(param.dtype))
        return layer.to(device=spec["device"])


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    """(name, layer) of every MoE layer of ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]


@functools.cache
def _triton_ready(device: str) -> bool:
    """Whether the Triton path compiles and matches the loop on this device (checked once, on a tiny problem).
    ``auto`` falls back to grouped GEMMs, with a warning, where it does not."""
    dev = torch.device(device)
    probe = torch.empty(0, device=dev)
    if not triton_supported(probe):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        experts = Experts(4, 32, 64, 32).to(dev)
        x = torch.randn(37, 32, generator=gen).to(dev)
        expert = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(37)]).to(dev)
        weight = torch.rand(37, 2, generator=gen).to(dev)
        r = Routing(expert, weight, probe, probe)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            got = DISPATCHERS["triton"](x, r, experts)[0].float()
            want = DISPATCHERS["loop"](x, r, experts)[0].float()
        ok = bool(torch.allclose(got, want, rtol=0.05, atol=0.05))
        if not ok:
            warnings.warn("moe-cli: the Triton MoE kernels disagree with the reference on this device; impl auto "
                          "uses grouped GEMMs instead", RuntimeWarning, stacklevel=2)
        return ok
    except Exception as e:  # a Triton or driver that cannot build the kernels
        warnings.warn(f"moe-cli: the Triton MoE kernels do not run on this device ({type(e).__name__}: {e}); "
                      "impl auto uses grouped GEMMs instead", RuntimeWarning, stacklevel=2)
        return False


def triton_ready(device: torch.device) -> bool:
    return _triton_ready(str(device))


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
