"""Inference-time expert control: top-k, capacity factor, and switching experts off per layer. Errors name the
arguments through ``label`` (``top_k`` in the library, ``--top-k`` on the command line)."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from moe_cli.checks import Label, argument, labelled
from moe_cli.errors import ConfigError
from moe_cli.moe.config import Gate
from moe_cli.moe.layer import moe_layers


def parse_disabled(spec: str | None, label: Label = argument, option: str = "disable_experts") -> dict[int, set[int]]:
    """'3:1,5:0' -> {3: {1}, 5: {0}} (MoE layer index : expert index)."""
    out: dict[int, set[int]] = {}
    if not spec:
        return out
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise ConfigError(f"{label(option)} expects LAYER:EXPERT pairs like 3:1,5:0; got {part!r}")
        out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def check_layer_indices(indices, count: int, where: str) -> None:
    """MoE layer indices named by the user exist among the ``count`` layers."""
    for index in indices:
        if not 0 <= index < count:
            raise ConfigError(f"{where}: MoE layer {index} does not exist (0..{count - 1})")


def apply_overrides(model: nn.Module, top_k: int | None = None, capacity_factor: float | None = None,
                    disable_experts: str | dict[int, set[int]] | None = None, label: Label = argument) -> nn.Module:
    """Change routing of every MoE layer in place (a soft gate given ``top_k`` becomes a top-k gate). Each change
    goes through the layer's config, so it is checked as the config is everywhere else, in ``label``'s words."""
    layers = moe_layers(model)
    if (top_k is not None or capacity_factor is not None or disable_experts) and not layers:
        raise ConfigError("routing overrides need an MoE model; this checkpoint has no MoE layers")
    disabled = parse_disabled(disable_experts, label) if isinstance(disable_experts, str) or disable_experts is None \
        else disable_experts
    check_layer_indices(disabled, len(layers), label("disable_experts"))
    for i, (name, m) in enumerate(layers):
        changes: dict = {}
        if top_k is not None:
            if m.cfg.gate == Gate.expert_choice:
                raise ConfigError(f"{label('top_k')} does not apply to `{name}`: its experts choose their tokens "
                                  f"(expert_choice); change {label('capacity_factor')} instead")
            changes.update(k=top_k) if m.cfg.gate == Gate.top_p else changes.update(gate=Gate.topk, k=top_k)
        if capacity_factor is not None:
            changes.update(capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
        if i in disabled:
            changes.update(disabled=tuple(sorted(disabled[i])))

        def words(field: str, name=name, i=i) -> str:
            return {"k": label("top_k") if top_k is not None else "k", "experts": f"the experts of `{name}`",
                    "disabled": f"{label('disable_experts')} layer {i} (`{name}`)"}.get(field, label(field))

        if changes:
            with labelled(words):
                m.reconfigure(dataclasses.replace(m.cfg, **changes))
    return model
