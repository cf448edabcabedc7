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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from moe_cli.errors import ConfigError


class Gate(str, Enum):
    topk = "topk"  # token choice: each token picks its k experts
    top_p = "top_p"  # adaptive: the fewest experts whose probabilities add up to top_p (1..k)
    soft = "soft"  # dense: every expert, softmax weights
    expert_choice = "expert_choice"  # each expert picks its top tokens


class Priority(str, Enum):
    slot = "slot"  # overflow: first choices before second choices, then token order
    score = "score"  # overflow: by top gate weight (Batch Prioritized Routing)


class Impl(str, Enum):
    auto = "auto"
    loop = "loop"  # one F.linear per expert (host sync for the group sizes)
    grouped = "grouped"  # two F.grouped_mm over expert-sorted rows (no host sync)
    triton = "triton"  # ScatterMoE-style fused gather/scatter GEMMs (CUDA; CPU under TRITON_INTERPRET=1)


class Init(str, Enum):
    copy = "copy"
    drop = "drop"
    split = "split"


class Split(str, Enum):
    cluster = "cluster"
    random = "random"


class RouterInit(str, Enum):
    random = "random"
    kmeans = "kmeans"
    activation = "activation"


GATES = tuple(g.value for g in Gate)
PRIORITIES = tuple(p.value for p in Priority)
IMPLS = tuple(i.value for i in Impl)
ROUTER_STD = 0.02

Label = Callable[[str], str]


def flag(name: str) -> str:
    """``capacity_factor`` -> ``--capacity-factor`` (how the CLI spells a field)."""
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MoEConfig:
    """How an MoE layer routes and runs its experts."""

    experts: int = 4
    k: int = 2  # experts per token (topk); ignored by soft and expert_choice gates
    gate: Literal["topk", "top_p", "soft", "expert_choice"] = "topk"
    normalize: bool = True  # topk: softmax over the k kept logits (else the top-k of the full softmax)
    top_p: float = 0.5  # gate top_p: probability mass a token's experts must reach
    combine: Literal["weighted", "sum"] = "weighted"  # sum: chosen experts' outputs added with weight exactly 1
    router_noise: float = 0.0  # std of Gaussian noise on the router logits in training (topk, soft)
    capacity_factor: float | None = None  # None: no token dropping (token choice); expert choice default 1.0
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    priority: Literal["slot", "score"] = "slot"  # who keeps its place when an expert overflows
    impl: Literal["auto", "loop", "grouped", "triton"] = "auto"  # expert dispatch

    def validate(self, label: Label = flag) -> MoEConfig:
        """Check every field and their combinations; returns self so it chains."""
        for name in ("experts", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{label(name)} must be an integer, got {value!r}")
        if self.experts < 1:
            raise ConfigError(f"{label('experts')} must be at least 1, got {self.experts}")
        if self.gate not in GATES:
            raise ConfigError(f"{label('gate')} must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.gate in ("topk", "top_p") and not 1 <= self.k <= self.experts:
            raise ConfigError(f"{label('k')} must be between 1 and {label('experts')} ({self.experts}), got {self.k}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"{label('normalize')} must be true or false, got {self.normalize!r}")
        _check_std(self, "router_noise", label)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{label(name)} must be a finite number > 0, got {value!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"{label('top_p')} must be in (0, 1], got {self.top_p!r}")
        if self.combine not in ("weighted", "sum"):
            raise ConfigError(f"{label('combine')} must be weighted or sum, got {self.combine!r}")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"{label('priority')} must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"{label('impl')} must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        return self

    @property
    def active_experts(self) -> float:
        """Experts each token runs through on average (expert choice: cf experts per token)."""
        if self.gate == "soft":
            return self.experts
        if self.gate == "expert_choice":
            return min(self.experts, self.capacity_factor or 1.0)
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
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in names})
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


@dataclass(frozen=True)
class UpcycleCfg(MoEConfig):
    """Upcycling a dense model (recipe section ``model.upcycle``, the ``moe upcycle`` options): the layer settings
    plus which FFNs become MoE layers."""

    layers: str = "all"  # all, every-N, last-N or a list like 0,3,5 (indices into the FFNs found)
    target: str | None = None  # glob over module names for non-timm FFNs, e.g. 'blocks.*.ffn'
    noise_std: float = 0.0  # std of Gaussian noise added to each expert's copy of the dense weights
    init: Literal["copy", "drop", "split"] = "copy"  # how experts start (moe_cli.moe.init)
    drop_ratio: float = 0.5  # init drop: share of hidden units re-initialised per expert
    split: Literal["cluster", "random"] = "cluster"  # init split: how hidden units are grouped into experts
    router_init: Literal["random", "kmeans", "activation"] = "random"  # kmeans / activation need calib data
    calib: str | None = None  # calibration images for router_init: digits or an image folder
    calib_batches: int = 4  # calibration batches (of 64 images)

    def validate(self, label: Label = flag) -> UpcycleCfg:
        super().validate(label)
        _check_std(self, "noise_std", label)
        if self.init not in ("copy", "drop", "split"):
            raise ConfigError(f"{label('init')} must be copy, drop or split, got {self.init!r}")
        if not _is_number(self.drop_ratio) or not 0 <= self.drop_ratio < 1:
            raise ConfigError(f"{label('drop_ratio')} must be in [0, 1), got {self.drop_ratio!r}")
        if self.split not in ("cluster", "random"):
            raise ConfigError(f"{label('split')} must be cluster or random, got {self.split!r}")
        if self.router_init not in ("random", "kmeans", "activation"):
            raise ConfigError(f"{label('router_init')} must be random, kmeans or activation, got {self.router_init!r}")
        if self.router_init == "activation" and self.init != "split":
            raise ConfigError(f"{label('router_init')} activation predicts which split slice is most active: it needs "
                              f"{label('init')} split")
        if self.router_init != "random" and not self.calib:
            raise ConfigError(f"{label('router_init')} {self.router_init} learns from data: give {label('calib')} "
                              "(digits or an image folder)")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ConfigError(f"{label('calib_batches')} must be an integer >= 1, got {self.calib_batches!r}")
        if self.init == "split" and self.gate not in ("topk", "top_p"):
            raise ConfigError(f"{label('init')} split routes each token to k of the slices: use {label('gate')} topk "
                              "or top_p")
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise ConfigError(f"{label('layers')} must be all, every-N, last-N or a list like 0,3,5; "
                              f"got {self.layers!r}")
        return self


@dataclass(frozen=True)
class MoELayout(MoEConfig):
    """The MoE part of a checkpoint (metadata ``moe``): the layer settings, the module names converted, and how
    the experts were made (``split`` experts hold H/E hidden units, so the shapes depend on it)."""

    layers: tuple[str, ...] = field(default_factory=tuple)
    init: str = "copy"

    def validate(self, label: Label = flag) -> MoELayout:
        super().validate(label)
        if not isinstance(self.layers, tuple) or not all(isinstance(n, str) and n for n in self.layers):
            raise ConfigError(f"{label('layers')} must be a list of module names, got {self.layers!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict, label: Label = flag) -> MoELayout:
        if isinstance(d, dict) and isinstance(d.get("layers"), list):
            d = {**d, "layers": tuple(d["layers"])}
        return super().from_dict(d, label)
