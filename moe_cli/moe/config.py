"""The MoE layer's configuration: one frozen dataclass, its rules checked once, when it is made.

`MoEConfig` is what an :class:`~moe_cli.moe.layer.MoEMlp` is built from and what it owns (``layer.cfg``). The
other places that speak about MoE settings extend it instead of repeating it:

- ``UpcycleCfg`` (recipe section ``model.upcycle`` and the ``moe upcycle`` options) adds *which* FFNs to convert;
- ``MoELayout`` (checkpoint metadata ``moe``) adds the module names that were converted;
- inference overrides (``--top-k``, ``--capacity-factor``) are :meth:`~moe_cli.checks.Checked.replace` on it.

Every rule raises a one-line :class:`~moe_cli.errors.ConfigError` in the words of the label in force when the
config is made (:func:`moe_cli.checks.labelled`: ``--experts`` on the command line, ```model.upcycle.experts` in
run.yaml`` in a recipe, ``experts`` in the library). Each field's help (``moe upcycle --help``) is its
``doc`` metadata, and each choice's is the comment-free ``HELP`` of its Choice.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from moe_cli.checks import Checked, Label, argument, check, finite, flag, is_int, is_number, labelled, plain
from moe_cli.errors import ConfigError
from moe_cli.moe.dispatchers import DISPATCHER_HELP
from moe_cli.runtime import Choice


def doc(default: Any, text: str, **more) -> Any:
    """A dataclass field with its help text (the CLI options and docs read it)."""
    return field(default=default, metadata={"doc": text, **more})


Gate = Choice.of("Gate", topk="each token its k best experts (softmax)",
                 sigmoid_topk="the same on sigmoid scores (DeepSeek-V3)",
                 top_p="the fewest experts whose probabilities reach top_p (1..k)",
                 soft="every expert, softmax weights (dense)", expert_choice="each expert picks its best tokens")
Balance = Choice.of("Balance", aux="the load-balance loss (moe.load_balance in recipes)",
                    aux_free="a per-expert selection bias nudged after each step (DeepSeek-V3)")
Priority = Choice.of("Priority", slot="first choices before second choices, then token order",
                     score="by top gate weight (Batch Prioritized Routing)")
Combine = Choice.of("Combine", weighted="the chosen experts' outputs weighted by the gate",
                    sum="added with weight exactly 1 (split experts: slices of one FFN)")
# expert dispatch: `auto` or a dispatcher of the registry (moe_cli.moe.dispatchers), in its order of preference
Impl = Choice.of("Impl", auto="picks by device and shape", **DISPATCHER_HELP)
Init = Choice.of("Init", copy="every expert is the dense FFN",
                 drop="Drop-Upcycling: a share of each expert's hidden units re-initialised",
                 split="MoEfication: each expert a slice of the hidden units (combine: sum)")
Split = Choice.of("Split", cluster="balanced k-means over the first projection's rows", random="a random partition")
RouterInit = Choice.of("RouterInit", random="N(0, 0.02)",
                       kmeans="the centres of each layer's inputs on the calibration data",
                       activation="split experts: predict the most active slice")

TOKEN_CHOICE = (Gate.topk, Gate.sigmoid_topk, Gate.top_p)  # each token picks k experts (k bounded by the experts)
ROUTER_STD = 0.02


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


def _std(cfg: Any, name: str, label: Label) -> None:
    check(finite(getattr(cfg, name)) and getattr(cfg, name) >= 0, label(name), "a finite number >= 0",
          getattr(cfg, name))


def _flag_field(cfg: Any, name: str, label: Label) -> None:
    check(isinstance(getattr(cfg, name), bool), label(name), "true or false", getattr(cfg, name))


@dataclass(frozen=True)
class MoEConfig(Checked):
    """How an MoE layer routes and runs its experts."""

    experts: int = doc(4, "Experts per MoE layer.", short="-e")
    k: int = doc(2, "Experts each token is routed to (topk, top_p; soft and expert_choice ignore it).", short="-k")
    gate: Gate = doc(Gate.topk, "How tokens and experts are matched.")
    normalize: bool = doc(True, "topk / top_p: renormalise the kept experts' weights (else raw softmax "
                                "probabilities).")
    top_p: float = doc(0.5, "gate top_p: probability mass each token's experts reach.")
    combine: Combine = doc(Combine.weighted, "How the chosen experts' outputs add up.", cli=False)
    router_noise: float = doc(0.0, "Std of Gaussian noise on the router logits in training (topk, soft).")
    capacity_factor: float | None = doc(None, "Token choice: capacity C = cf*k*T/E, overflow dropped. Expert "
                                              "choice: C = cf*T/E (default 1). Unset: no dropping.")
    eval_capacity_factor: float | None = doc(None, "Capacity factor in eval mode (default: the same).")
    priority: Priority = doc(Priority.slot, "Who keeps its place when an expert overflows.")
    impl: Impl = doc(Impl.auto, "Expert dispatch.")
    disabled: tuple[int, ...] = doc((), "Experts switched off (an inference override).", cli=False)
    route_scale: float = doc(1.0, "gate sigmoid_topk: scale of the combine weights (DeepSeek-V3).")
    balance: Balance = doc(Balance.aux, "How expert load is balanced.")
    bias_update: float = doc(0.001, "balance aux_free: step u in bias += u * sign(mean load - load) per optimizer "
                                    "step.")
    shared_experts: int = doc(0, "Always-on experts added to the routed ones (DeepSeek-MoE, Qwen2-MoE).")
    shared_gate: bool = doc(False, "Scale the shared experts per token by a sigmoid gate (Qwen2-MoE).")

    def validate(self, label: Label = argument) -> MoEConfig:
        """Check every field and their combinations; returns self so it chains."""
        for name in ("experts", "k"):
            check(is_int(getattr(self, name)), label(name), "an integer", getattr(self, name))
        check(self.experts >= 1, label("experts"), "at least 1", self.experts)
        check_choices(self, label)
        if self.gate in TOKEN_CHOICE and not 1 <= self.k <= self.experts:
            raise ConfigError(f"{label('k')} must be between 1 and {label('experts')} ({self.experts}), got {self.k}")
        if not isinstance(self.disabled, tuple) or not all(is_int(e) and 0 <= e < self.experts for e in self.disabled):
            raise ConfigError(f"{label('disabled')} must list experts between 0 and {self.experts - 1}, "
                              f"got {list(self.disabled) if isinstance(self.disabled, tuple) else self.disabled!r}")
        enabled = self.experts - len(set(self.disabled))
        if enabled < 1 or (self.gate in TOKEN_CHOICE and enabled < self.k):
            raise ConfigError(f"switching off experts {sorted(self.disabled)} leaves {enabled} expert(s), fewer "
                              f"than {label('k')}={self.k}")
        _flag_field(self, "normalize", label)
        _std(self, "router_noise", label)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            check(value is None or finite(value) and value > 0, label(name), "a finite number > 0", value)
        if self.gate in (Gate.top_p, Gate.soft):
            for name in ("capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{label(name)} limits how many tokens an expert takes (gates topk and "
                                      f"expert_choice); gate {self.gate} does not drop tokens")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, label("top_p"), "in (0, 1]", self.top_p)
        check(finite(self.route_scale) and self.route_scale > 0, label("route_scale"), "a finite number > 0",
              self.route_scale)
        _std(self, "bias_update", label)
        if self.balance == Balance.aux_free and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('balance')} aux_free biases which experts tokens choose: use {label('gate')} "
                              "topk, sigmoid_topk or top_p")
        check(is_int(self.shared_experts) and 0 <= self.shared_experts <= 64, label("shared_experts"),
              "an integer in [0, 64]", self.shared_experts)
        _flag_field(self, "shared_gate", label)
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
        """Just the layer's own fields (drops what subclasses add), in this config's words."""
        with labelled(self.words()):
            return MoEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoEConfig)})

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, label: Label = argument):
        """Build from a mapping (unknown keys are ignored, for checkpoints written by newer versions), checked in
        the words of ``label``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{label('')} must be a mapping of MoE settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        tuples = {f.name for f in dataclasses.fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name])
                  is tuple}
        with labelled(label):
            try:
                return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()
                              if k in names})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{label('')}: {e}") from None


def for_init(cfg: MoEConfig, init: str) -> MoEConfig:
    """The layer config for experts made by ``init``: split experts are slices of one FFN, so the chosen ones are
    added with weight 1 (``combine: sum``); the other inits keep ``cfg``."""
    return cfg.replace(combine=Combine.sum) if init == Init.split else cfg


LAYERS_SYNTAX = "all, every-N, last-N or a list like 0,3,5"


def parse_layers(spec: Any, label: Label = argument) -> tuple[str, Any]:
    """The syntax of a layer selection, checked without a model: ('all', None), ('every', N), ('last', N) or
    ('list', sorted indices). Which indices exist is checked by :func:`select_layers` against the model."""
    text = spec.strip() if isinstance(spec, str) else ""
    if text == "all":
        return "all", None
    if m := re.fullmatch(r"(every|last)-(\d+)", text):
        n = int(m.group(2))
        check(n >= 1, label("layers"), f"{m.group(1)}-N with N >= 1", spec)
        return m.group(1), n
    try:
        idx = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise ConfigError(f"{label('layers')} must be {LAYERS_SYNTAX}; got {spec!r}") from None
    check(all(i >= 0 for i in idx), label("layers"), "indices >= 0", spec)
    return "list", idx


def select_layers(count: int, spec: str, label: Label = argument) -> list[int]:
    """Indices into the list of ``count`` FFNs: 'all', 'every-N' (each N-th, ending on the last), 'last-N', or
    '0,3,5'."""
    kind, n = parse_layers(spec, label)
    if kind == "all":
        return list(range(count))
    if kind == "every":
        return [i for i in range(count) if (count - 1 - i) % n == 0]
    if kind == "last":
        if n > count:
            raise ConfigError(f"{label('layers')} {spec!r}: the model has {count} FFN layers")
        return list(range(count - n, count))
    bad = [i for i in n if i >= count]
    if bad:
        raise ConfigError(f"{label('layers')}: index {bad[0]} out of range, the model has {count} FFN layers "
                          f"(0..{count - 1})")
    return n


@dataclass(frozen=True)
class UpcycleCfg(MoEConfig):
    """Upcycling a dense model (recipe section ``model.upcycle``, the ``moe upcycle`` options): the layer settings
    plus which FFNs become MoE layers and how their experts and routers start."""

    layers: str = doc("all", f"Which FFNs: {LAYERS_SYNTAX} (indices into the FFNs found).")
    target: str | None = doc(None, "Glob over module names for FFNs of other layouts, e.g. 'blocks.*.ffn'.")
    noise_std: float = doc(0.0, "Std of Gaussian noise added to each expert's copy of the dense weights.")
    init: Init = doc(Init.copy, "How experts start.")
    drop_ratio: float = doc(0.5, "init drop: share of hidden units re-initialised per expert.")
    split: Split = doc(Split.cluster, "init split: how hidden units are grouped into experts.")
    router_init: RouterInit = doc(RouterInit.random, "How routers start (kmeans, activation: from calib data).")
    calib: str | None = doc(None, "Calibration images for router_init: digits or an image folder.")
    calib_batches: int = doc(4, "Calibration batches of 64 images.")

    def validate(self, label: Label = argument) -> UpcycleCfg:
        super().validate(label)
        _std(self, "noise_std", label)
        check(is_number(self.drop_ratio) and 0 <= self.drop_ratio < 1, label("drop_ratio"), "in [0, 1)",
              self.drop_ratio)
        if self.router_init == RouterInit.activation and self.init != Init.split:
            raise ConfigError(f"{label('router_init')} activation predicts which split slice is most active: it needs "
                              f"{label('init')} split")
        if self.router_init != RouterInit.random and not self.calib:
            raise ConfigError(f"{label('router_init')} {self.router_init} learns from data: give {label('calib')} "
                              "(digits or an image folder)")
        check(is_int(self.calib_batches) and self.calib_batches >= 1, label("calib_batches"), "an integer >= 1",
              self.calib_batches)
        if self.init == Init.split and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('init')} split routes each token to k of the slices: use {label('gate')} topk "
                              "or top_p")
        if not self.normalize and self.gate not in TOKEN_CHOICE:
            raise ConfigError(f"{label('normalize')} only applies to {label('gate')} topk and top_p")
        parse_layers(self.layers, label)
        check(self.target is None or isinstance(self.target, str) and self.target.strip() != "", label("target"),
              "a glob over module names like 'blocks.*.mlp'", self.target)
        return self

    def cannot_reproduce(self) -> str:
        """Why an MoE made with these settings cannot compute what the dense model did, where that is known before
        building it ('' otherwise): the upcycling check of ``moe upcycle`` refuses these up front."""
        every = self.gate == Gate.topk and self.k == self.experts  # raw probabilities of all experts add up to 1
        if self.gate == Gate.sigmoid_topk and self.route_scale != 1 and self.init == Init.copy:
            return (f"{self.label('route_scale')} {self.route_scale} scales the sum of the copies of the dense FFN, "
                    "so the MoE cannot reproduce the dense model; upcycle with route_scale 1")
        if not self.normalize and self.gate in TOKEN_CHOICE and self.init == Init.copy and not every:
            return (f"{self.label('normalize')} false weighs the copies of the dense FFN by router probabilities that "
                    "do not add up to 1, so the MoE cannot reproduce the dense model (the upcycling invariant); keep "
                    "normalize, or route every token to all experts (k = experts)")
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

    def validate(self, label: Label = argument) -> MoELayout:
        super().validate(label)
        if not isinstance(self.layers, tuple) or not all(isinstance(n, str) and n for n in self.layers):
            raise ConfigError(f"{label('layers')} must be a list of module names, got {self.layers!r}")
        for name in ("layer_experts", "layer_hidden"):
            value = getattr(self, name)
            if value and (len(value) != len(self.layers) or not all(is_int(v) and v >= 1 for v in value)):
                raise ConfigError(f"{label(name)} must list one integer >= 1 per MoE layer ({len(self.layers)}), "
                                  f"got {list(value)!r}")
        with labelled(label):
            for experts in self.layer_experts:
                MoEConfig(**{**self.routing().values(), "experts": experts, "disabled": ()})
        return self

    def layer(self, index: int) -> MoEConfig:
        """The config of layer ``index``."""
        cfg = self.routing()
        return cfg.replace(experts=self.layer_experts[index]) if self.layer_experts else cfg


__all__ = ["ROUTER_STD", "TOKEN_CHOICE", "Balance", "Combine", "Gate", "Impl", "Init", "MoEConfig", "MoELayout",
           "Priority", "RouterInit", "Split", "UpcycleCfg", "doc", "enum_type", "flag", "for_init", "parse_layers",
           "select_layers"]
