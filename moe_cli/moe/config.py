"""The MoE layer's configuration: one frozen dataclass, validated in one place.

`MoEConfig` is what an :class:`~moe_cli.moe.layer.MoEMlp` is built from and what it owns (``layer.cfg``). The
other places that speak about MoE settings extend it instead of repeating it:

- ``UpcycleCfg`` (recipe section ``model.upcycle`` and the ``moe upcycle`` options) adds *which* FFNs to convert;
- ``MoELayout`` (checkpoint metadata ``moe``) adds the module names that were converted;
- inference overrides (``--top-k``, ``--capacity-factor``) are ``dataclasses.replace`` on it, validated again.

Every check raises a one-line :class:`~moe_cli.errors.ConfigError`; ``label`` turns a field name into the way
the caller's user spells it (``--experts`` on the command line, ```model.upcycle.experts` in run.yaml`` in a
recipe, ``moe.experts`` in a checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from moe_cli.errors import ConfigError
from moe_cli.moe.dispatchers import DISPATCHER_NAMES
from moe_cli.runtime import Choice


class Gate(Choice):
    topk = "topk"  # token choice: each token picks its k experts (softmax affinities)
    sigmoid_topk = "sigmoid_topk"  # token choice on sigmoid affinities (DeepSeek-V3)
    top_p = "top_p"  # adaptive: the fewest experts whose probabilities add up to top_p (1..k)
    soft = "soft"  # dense: every expert, softmax weights
    expert_choice = "expert_choice"  # each expert picks its top tokens


class Balance(Choice):
    aux = "aux"  # the load-balance loss (moe.load_balance in recipes)
    aux_free = "aux_free"  # DeepSeek-V3: a per-expert selection bias, nudged after each step toward balance


class Priority(Choice):
    slot = "slot"  # overflow: first choices before second choices, then token order
    score = "score"  # overflow: by top gate weight (Batch Prioritized Routing)


class Combine(Choice):
    weighted = "weighted"  # chosen experts' outputs weighted by the gate
    sum = "sum"  # added with weight exactly 1 (split experts: slices of one FFN)


# expert dispatch: `auto` or a dispatcher of the registry (moe_cli.moe.dispatchers), in its order of preference
Impl = Choice("Impl", [("auto", "auto"), *((name, name) for name in DISPATCHER_NAMES)])


class Init(Choice):
    copy = "copy"  # every expert is the dense FFN
    drop = "drop"  # Drop-Upcycling: a share of each expert's hidden units re-initialised
    split = "split"  # MoEfication: each expert a slice of the hidden units (combine: sum)


class Split(Choice):
    cluster = "cluster"  # balanced k-means over fc1 rows
    random = "random"


class RouterInit(Choice):
    random = "random"
    kmeans = "kmeans"
    activation = "activation"


TOKEN_CHOICE = (Gate.topk, Gate.sigmoid_topk, Gate.top_p)  # each token picks k experts (k bounded by the experts)
ROUTER_STD = 0.02

Label = Callable[[str], str]


def flag(name: str) -> str:
    """``capacity_factor`` -> ``--capacity-factor`` (how the CLI spells a field)."""
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def enum_type(tp: Any) -> type[Enum] | None:
    """The Enum class of a field annotation (``Gate`` or ``Gate | None``), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and issubclass(arg, Enum):
            return arg
    return None


def check_choices(cfg: Any, label: Label) -> None:
    """Every Enum-typed field of the dataclass ``cfg`` holds one of its choices (the one place choices are
    checked: the names come from the Enum)."""
    for f in dataclasses.fields(cfg):
        kind = enum_type(typing.get_type_hints(type(cfg))[f.name])
        value = getattr(cfg, f.name)
        if kind is not None and value is not None and value not in {e.value for e in kind}:
            names = ", ".join(e.value for e in kind)
            raise ConfigError(f"{label(f.name)} must be one of {names}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """How an MoE layer routes and runs its experts."""

    experts: int = 4
    k: int = 2  # experts per token (topk, top_p); ignored by soft and expert_choice gates
    gate: Gate = Gate.topk
    normalize: bool = True  # topk / top_p: renormalise the kept experts' weights (else raw softmax probabilities)
    top_p: float = 0.5  # gate top_p: probability mass a token's experts must reach
    combine: Combine = Combine.weighted
    router_noise: float = 0.0  # std of Gaussian noise on the router logits in training (topk, soft)
    capacity_factor: float | None = None  # None: no token dropping (token choice); expert choice default 1.0
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    priority: Priority = Priority.slot  # who keeps its place when an expert overflows
    impl: Impl = Impl.auto  # expert dispatch
    disabled: tuple[int, ...] = ()  # experts switched off (an inference override: no token is sent to them)
    route_scale: float = 1.0  # sigmoid_topk: the combine weights are multiplied by it (DeepSeek-V3)
    balance: Balance = Balance.aux
    bias_update: float = 0.001  # balance aux_free: u in bias += u * sign(mean load - load), per optimizer step
    shared_experts: int = 0  # always-on experts added to the routed output (DeepSeek-MoE, Qwen2-MoE)
    shared_gate: bool = False  # scale the shared experts' output per token by sigmoid(x w) (Qwen2-MoE)

    def validate(self, label: Label = flag) -> MoEConfig:
        """Check every field and their combinations; returns self so it chains."""
        for name in ("experts", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{label(name)} must be an integer, got {value!r}")
        if self.experts < 1:
            raise ConfigError(f"{label('experts')} must be at least 1, got {self.experts}")
        check_choices(self, label)
        if self.gate in TOKEN_CHOICE and not 1 <= self.k <= self.experts:
            raise ConfigError(f"{label('k')} must be between 1 and {label('experts')} ({self.experts}), got {self.k}")
        if not isinstance(self.disabled, tuple) or not all(isinstance(e, int) and 0 <= e < self.experts
                                                           for e in self.disabled):
            raise ConfigError(f"{label('disabled')} must list experts between 0 and {self.experts - 1}, "
                              f"got {list(self.disabled) if isinstance(self.disabled, tuple) else self.disabled!r}")
        enabled = self.experts - len(set(self.disabled))
        if enabled < 1 or (self.gate in TOKEN_CHOICE and enabled < self.k):
            raise ConfigError(f"switching off experts {sorted(self.disabled)} leaves {enabled} expert(s), fewer "
                              f"than {label('k')}={self.k}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"{label('normalize')} must be true or false, got {self.normalize!r}")
        _check_std(self, "router_noise", label)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{label(name)} must be a finite number > 0, got {value!r}")
        if self.gate in (Gate.top_p, Gate.soft):
            for name in ("capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{label(name)} limits how many tokens an expert takes (gates topk and "
                                      f"expert_choice); gate {self.gate} does not drop tokens")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"{label('top_p')} must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.route_scale) or not math.isfinite(self.route_scale) or self.route_scale <= 0:
            raise ConfigError(f"{label('route_scale')} must be a finite number > 0, got {self.route_scale!r}")
        _check_std(self, "bias_update", label)
        if self.balance == Balance.aux_free and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('balance')} aux_free biases which experts tokens choose: use {label('gate')} "
                              "topk, sigmoid_topk or top_p")
        if not isinstance(self.shared_experts, int) or isinstance(self.shared_experts, bool) or \
                not 0 <= self.shared_experts <= 64:
            raise ConfigError(f"{label('shared_experts')} must be an integer in [0, 64], got {self.shared_experts!r}")
        if not isinstance(self.shared_gate, bool):
            raise ConfigError(f"{label('shared_gate')} must be true or false, got {self.shared_gate!r}")
        if self.shared_gate and not self.shared_experts:
            raise ConfigError(f"{label('shared_gate')} gates the shared experts: set {label('shared_experts')} too")
        return self

    @property
    def active_experts(self) -> float:
        """Experts each token runs through on average (expert choice: cf experts per token), with the switched-off
        experts off."""
        enabled = self.experts - len(set(self.disabled))
        if self.gate == Gate.soft:
            return enabled
        if self.gate == Gate.expert_choice:
            return min(enabled, (self.capacity_factor or 1.0) * enabled / self.experts)
        return self.k  # top_p: at most k (moe eval measures the mean)

    def routing(self) -> MoEConfig:
        """Just the layer's own fields (drops what subclasses add)."""
        return MoEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoEConfig)})

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, label: Label = flag):
        """Build from a mapping (unknown keys are ignored, for checkpoints written by newer versions) and validate."""
        if not isinstance(d, dict):
            raise ConfigError(f"{label('')} must be a mapping of MoE settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        tuples = {f.name for f in dataclasses.fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name])
                  is tuple}
        try:
            cfg = cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()
                         if k in names})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{label('')}: {e}") from None
        return cfg.validate(label)


def _check_std(cfg: MoEConfig, name: str, label: Label) -> None:
    value = getattr(cfg, name)
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{label(name)} must be a finite number >= 0, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def for_init(cfg: MoEConfig, init: str) -> MoEConfig:
    """The layer config for experts made by ``init``: split experts are slices of one FFN, so the chosen ones are
    added with weight 1 (``combine: sum``); the other inits keep ``cfg``."""
    return dataclasses.replace(cfg, combine=Combine.sum) if init == Init.split else cfg


@dataclass(frozen=True)
class UpcycleCfg(MoEConfig):
    """Upcycling a dense model (recipe section ``model.upcycle``, the ``moe upcycle`` options): the layer settings
    plus which FFNs become MoE layers and how their experts and routers start."""

    layers: str = "all"  # all, every-N, last-N or a list like 0,3,5 (indices into the FFNs found)
    target: str | None = None  # glob over module names for non-timm FFNs, e.g. 'blocks.*.ffn'
    noise_std: float = 0.0  # std of Gaussian noise added to each expert's copy of the dense weights
    init: Init = Init.copy  # how experts start (moe_cli.moe.init)
    drop_ratio: float = 0.5  # init drop: share of hidden units re-initialised per expert
    split: Split = Split.cluster  # init split: how hidden units are grouped into experts
    router_init: RouterInit = RouterInit.random  # kmeans / activation need calib data
    calib: str | None = None  # calibration images for router_init: digits or an image folder
    calib_batches: int = 4  # calibration batches (of 64 images)

    def validate(self, label: Label = flag) -> UpcycleCfg:
        super().validate(label)
        _check_std(self, "noise_std", label)
        if not _is_number(self.drop_ratio) or not 0 <= self.drop_ratio < 1:
            raise ConfigError(f"{label('drop_ratio')} must be in [0, 1), got {self.drop_ratio!r}")
        if self.router_init == RouterInit.activation and self.init != Init.split:
            raise ConfigError(f"{label('router_init')} activation predicts which split slice is most active: it needs "
                              f"{label('init')} split")
        if self.router_init != RouterInit.random and not self.calib:
            raise ConfigError(f"{label('router_init')} {self.router_init} learns from data: give {label('calib')} "
                              "(digits or an image folder)")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ConfigError(f"{label('calib_batches')} must be an integer >= 1, got {self.calib_batches!r}")
        if self.init == Init.split and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('init')} split routes each token to k of the slices: use {label('gate')} topk "
                              "or top_p")
        if not self.normalize and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('normalize')} only applies to {label('gate')} topk and top_p")
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise ConfigError(f"{label('layers')} must be all, every-N, last-N or a list like 0,3,5; "
                              f"got {self.layers!r}")
        return self

    def cannot_reproduce(self) -> str:
        """Why an MoE made with these settings cannot compute what the dense model did, where that is known before
        building it ('' otherwise): the upcycling check of ``moe upcycle`` refuses these up front."""
        every = self.gate == Gate.topk and self.k == self.experts  # raw probabilities of all experts add up to 1
        if self.gate == Gate.sigmoid_topk and self.route_scale != 1 and self.init == Init.copy:
            return (f"route_scale {self.route_scale} scales the sum of the copies of the dense FFN, so the MoE "
                    "cannot reproduce the dense model; upcycle with route_scale 1")
        if not self.normalize and self.gate in TOKEN_CHOICE and self.init == Init.copy and not every:
            return ("normalize false weighs the copies of the dense FFN by router probabilities that do not add up "
                    "to 1, so the MoE cannot reproduce the dense model (the upcycling invariant); keep normalize, "
                    "or route every token to all experts (k = experts)")
        return ""

    def layer_config(self) -> MoEConfig:
        """The config the upcycled layers get."""
        return for_init(self.routing(), self.init)


@dataclass(frozen=True)
class MoELayout(MoEConfig):
    """The MoE part of a checkpoint (metadata ``moe``): the layers' shared settings, the module names converted,
    and each layer's shape (``layer_experts``, ``layer_hidden``: prune and merge leave layers with different expert
    counts; split experts hold a slice of the hidden units). Checkpoints written before v0.2 have no shapes:
    every layer then has ``experts``, and ``init`` says whether experts are split slices."""

    layers: tuple[str, ...] = field(default_factory=tuple)
    init: Init = Init.copy
    layer_experts: tuple[int, ...] = ()
    layer_hidden: tuple[int, ...] = ()

    def validate(self, label: Label = flag) -> MoELayout:
        super().validate(label)
        if not isinstance(self.layers, tuple) or not all(isinstance(n, str) and n for n in self.layers):
            raise ConfigError(f"{label('layers')} must be a list of module names, got {self.layers!r}")
        for name in ("layer_experts", "layer_hidden"):
            value = getattr(self, name)
            if value and (len(value) != len(self.layers) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    and v >= 1 for v in value)):
                raise ConfigError(f"{label(name)} must list one integer >= 1 per MoE layer ({len(self.layers)}), "
                                  f"got {list(value)!r}")
        for experts in self.layer_experts:
            dataclasses.replace(self.routing(), experts=experts, disabled=()).validate(label)
        return self

    def layer(self, index: int) -> MoEConfig:
        """The config of layer ``index``."""
        cfg = self.routing()
        return dataclasses.replace(cfg, experts=self.layer_experts[index]) if self.layer_experts else cfg
