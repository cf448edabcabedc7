"""MoEMlp: a drop-in Mixture-of-Experts replacement for timm's Mlp / GluMlp / SwiGLU, in three parts.

- a :class:`~moe_cli.moe.router.Router` (``layer.router``) turns tokens into a typed ``Routing``;
- a :class:`~moe_cli.moe.dispatch.Dispatcher` (``impl``; :mod:`moe_cli.moe.dispatchers`) groups tokens by expert
  and combines the outputs;
- :class:`~moe_cli.moe.experts.Experts` (``layer.experts``) holds the stacked expert weights and runs them.

The layer is the one owner of its state: one frozen :class:`~moe_cli.moe.config.MoEConfig` (``layer.cfg``),
changed only through :meth:`MoEMlp.reconfigure` (routing, switched-off experts) and :meth:`MoEMlp.select_experts`
(fewer experts for good), each validated and keeping router and experts consistent. It takes timm's
``mlp_layer`` keywords, so ``timm.create_model('vit_small_patch16_224', mlp_layer=partial(MoEMlp,
num_experts=8, k=2))`` builds an MoE ViT from scratch; :func:`moe_cli.moe.upcycling.from_dense` upcycles a trained FFN.
Aux losses and routing statistics are collected from outside with :class:`moe_cli.moe.recorder.RoutingRecorder`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.moe.config import ROUTER_STD, MoEConfig
from moe_cli.moe.dispatch import Dispatcher
from moe_cli.moe.dispatchers import dispatchers
from moe_cli.moe.expert_parallel import ExpertShard, expert_parallel
from moe_cli.moe.experts import PARAMS, Experts
from moe_cli.moe.router import Router, make_router

DISPATCHERS = dispatchers()


def layer_config(config: MoEConfig | None, num_experts: int | None = None, k: int | None = None,
                 moe: dict | None = None) -> MoEConfig:
    """``config`` (default MoEConfig()) with the keywords given (checked when made)."""
    given = {n: v for n, v in {"experts": num_experts, "k": k}.items() if v is not None}
    cfg = (config or MoEConfig()).routing()
    return cfg.replace(**given, **(moe or {})) if given or moe else cfg


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


_OP_BY_OP = contextvars.ContextVar("moe_cli_op_by_op_dispatch", default=False)


@contextlib.contextmanager
def op_by_op_dispatch() -> Iterator[None]:
    """Inside, every MoE layer runs the loop dispatcher (plain ``F.linear`` per expert over its rows, the same
    computation): what a FLOP counter needs, since the grouped and Triton paths run inside ops it cannot look
    into (``torch.utils.flop_counter.FlopCounterMode`` counts aten ops; a custom op or a Triton kernel is none)."""
    token = _OP_BY_OP.set(True)
    try:
        yield
    finally:
        _OP_BY_OP.reset(token)


class MoEMlp(nn.Module):
    """Mixture-of-Experts FFN with the forward signature and constructor keywords of timm's Mlp.

    MoE settings come from ``config`` (a :class:`MoEConfig`), overridden by ``num_experts``, ``k`` and any other
    MoEConfig field given as a keyword (``gate``, ``capacity_factor``, ``impl``, ...). ``glu=True`` makes
    GLU experts (act(x wg) * x w1), as timm's GluMlp / SwiGLU.
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
        ffn = (in_features, hidden_features, out_features, act_layer, glu, bias, _norm_eps(norm_layer, hidden_features),
               drop)
        self.experts = Experts(cfg.experts, *ffn, device=device, dtype=dtype)
        # always-on experts added to the routed output (DeepSeek-MoE, Qwen2-MoE), optionally gated per token
        self.shared = Experts(cfg.shared_experts, *ffn, device=device, dtype=dtype) if cfg.shared_experts else None
        self.shared_gate = nn.Linear(in_features, 1, bias=False, device=device, dtype=dtype) \
            if cfg.shared_gate else None
        self.expert_shard: ExpertShard | None = None  # expert parallelism: which experts this rank holds

    # ------------------------------------------------------------------ state

    @property
    def num_experts(self) -> int:
        return self.cfg.experts

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def active_experts(self) -> float:
        """Experts a token runs through on average (expert choice: with the capacity of the current mode)."""
        return self.cfg.replace(capacity_factor=self.router.capacity_factor).active_experts

    def reconfigure(self, cfg: MoEConfig | None = None, **changes) -> MoEMlp:
        """Switch to ``cfg`` (or the current config with ``changes``: gate, k, capacity, switched-off experts, ...),
        validated; the router is rebuilt for the new gate around the same weight. A refused change leaves the
        layer as it was. The number of experts changes only through :meth:`select_experts`."""
        new = layer_config(cfg or self.cfg, moe=changes)
        if new.experts != self.cfg.experts:
            raise ConfigError(f"experts cannot change from {self.cfg.experts} to {new.experts} (prune instead)")
        for name in ("shared_experts", "shared_gate", "balance"):
            if getattr(new, name) != getattr(self.cfg, name):
                raise ConfigError(f"{name} is part of the layer's structure; it cannot change after it is built")
        self.cfg = new
        self.router = make_router(self.router.weight.shape[1], new, like=self.router)
        return self

    @torch.no_grad()
    def select_experts(self, keep: list[int]) -> MoEMlp:
        """Keep only the experts ``keep`` (in that order), for good: expert weights, router rows and config shrink
        together (prune, merge). Switched-off experts are switched on again."""
        if self.expert_shard is not None:
            raise ConfigError("experts split over ranks (expert parallelism) cannot be selected; load the full "
                              "checkpoint on one process")
        if not keep or len(set(keep)) != len(keep) or not all(0 <= e < self.num_experts for e in keep):
            raise ConfigError(f"experts to keep must be distinct, between 0 and {self.num_experts - 1}, got {keep}")
        try:
            new = self.cfg.replace(experts=len(keep), disabled=())
        except ConfigError:
            raise ConfigError(f"keeping {len(keep)} expert(s) leaves fewer than k={self.k}") from None
        index = torch.tensor(keep, dtype=torch.long)
        self.experts.select(index)
        old = self.router
        self.cfg = new
        self.router = make_router(old.weight.shape[1], new, device=old.weight.device, dtype=old.weight.dtype)
        self.router.weight.copy_(old.weight[index.to(old.weight.device)])
        self.router.weight.requires_grad_(old.weight.requires_grad)
        if old.selection_bias is not None:  # the kept experts keep their aux-loss-free balancing bias
            self.router.expert_bias.copy_(old.selection_bias[index.to(old.selection_bias.device)])
        self.router.train(self.training)
        return self

    @torch.no_grad()
    def shard_experts(self, group) -> MoEMlp:
        """Expert parallelism: keep only this rank's share of the experts (rank p of the P ranks of ``group`` keeps
        experts p*E/P ... (p+1)*E/P - 1); the forward then exchanges tokens with the group. The router, shared
        experts and config stay whole."""
        import torch.distributed as dist

        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.expert_shard is not None:
            raise ConfigError("the experts are already split over ranks")
        if self.num_experts % size:
            raise ConfigError(f"train.expert_parallel: {size} ranks cannot split {self.num_experts} experts evenly "
                              f"(the number of experts must be a multiple of it)")
        self.expert_shard = shard = ExpertShard(group, rank, size, self.num_experts)
        self.experts.select(torch.arange(shard.experts.start, shard.experts.stop))
        return self

    def no_weight_decay(self) -> set[str]:
        names = {f"experts.{n}" for n in self.experts.no_weight_decay()}
        return names | ({f"shared.{n}" for n in self.shared.no_weight_decay()} if self.shared is not None else set())

    @torch.no_grad()
    def update_balance(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing: nudge the router's selection bias by this step's counts per expert (E,)."""
        if self.cfg.balance == "aux_free":
            self.router.update_bias(counts)

    # ------------------------------------------------------------------ forward

    def dispatcher(self, x: torch.Tensor) -> Dispatcher:
        """The configured dispatcher; ``auto``: the first of the registry that prefers ``x``; the loop inside
        :func:`op_by_op_dispatch` (never under torch.compile, whose tracer before torch 2.14 cannot read a
        ContextVar: a FLOP count runs eagerly)."""
        if not torch.compiler.is_compiling() and _OP_BY_OP.get():
            return DISPATCHERS["loop"]
        if self.cfg.impl == "auto":
            return next(d for d in DISPATCHERS.values() if d.preferred(x, self.experts))
        d = DISPATCHERS[self.cfg.impl]
        if not d.supports(x):
            raise ConfigError(f"impl {d.name} does not run on a {x.device.type} {str(x.dtype).removeprefix('torch.')} "
                              f"tensor here (see moe_cli.moe.dispatchers.{d.name})")
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        if self.expert_shard is not None:
            y_TO = expert_parallel(x_TD, routing, self.experts, self.expert_shard, self.dispatcher(x_TD))
        else:
            y_TO, _ = self.dispatcher(x_TD)(x_TD, routing, self.experts)
        if self.shared is not None:
            shared_TO = self.shared.dense(x_TD)
            if self.shared_gate is not None:
                shared_TO = torch.sigmoid(self.shared_gate(x_TD)) * shared_TO
            y_TO = y_TO + shared_TO
        y = y_TO.reshape(*lead, y_TO.shape[-1])
        return y.movedim(-1, 1) if self.channels_first else y

    def extra_repr(self) -> str:
        return f"gate={self.cfg.gate}, impl={self.cfg.impl}"


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    """(name, layer) of every MoE layer of ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]


def expert_shards(model: nn.Module) -> dict[str, range]:
    """Expert parallelism: parameter name -> the global indices of the experts this rank holds, for every stacked
    expert tensor of a layer whose experts are split over ranks (:meth:`MoEMlp.shard_experts`)."""
    return {f"{n}.experts.{p}": m.expert_shard.experts for n, m in moe_layers(model) if m.expert_shard is not None
            for p in PARAMS}
