"""Inference-time expert control: top-k, capacity factor, and switching experts off per layer."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.moe.config import Gate, flag
from moe_cli.moe.layer import moe_layers


def parse_disabled(spec: str | None) -> dict[int, set[int]]:
    """'3:1,5:0' -> {3: {1}, 5: {0}} (MoE layer index : expert index)."""
    out: dict[int, set[int]] = {}
    if not spec:
        return out
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise ConfigError(f"--disable-experts expects LAYER:EXPERT pairs like 3:1,5:0; got {part!r}")
        out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def apply_overrides(model: nn.Module, top_k: int | None = None, capacity_factor: float | None = None,
                    disable_experts: str | dict[int, set[int]] | None = None) -> nn.Module:
    """Change routing of every MoE layer in place (a soft gate given ``top_k`` becomes a top-k gate). Each change
    goes through the layer's config, so it is validated as the config is everywhere else."""
    layers = moe_layers(model)
    if (top_k is not None or capacity_factor is not None or disable_experts) and not layers:
        raise ConfigError("routing overrides need an MoE model; this checkpoint has no MoE layers")
    disabled = parse_disabled(disable_experts) if isinstance(disable_experts, str) or disable_experts is None \
        else disable_experts
    for index in disabled:
        if not 0 <= index < len(layers):
            raise ConfigError(f"--disable-experts: MoE layer {index} does not exist (0..{len(layers) - 1})")
    for i, (name, m) in enumerate(layers):
        changes: dict = {}
        if top_k is not None:
            if m.cfg.gate == Gate.expert_choice:
                raise ConfigError(f"--top-k does not apply to `{name}`: its experts choose their tokens "
                                  "(expert_choice); change --capacity-factor instead")
            changes.update(k=top_k) if m.cfg.gate == Gate.top_p else changes.update(gate=Gate.topk, k=top_k)
        if capacity_factor is not None:
            changes.update(capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
        if i in disabled:
            changes.update(disabled=tuple(sorted(disabled[i])))

        def label(field: str, name=name, i=i) -> str:
            return {"k": "--top-k" if top_k is not None else "k", "experts": f"the experts of `{name}`",
                    "disabled": f"--disable-experts layer {i} (`{name}`)"}.get(field, flag(field))

        if changes:
            m.reconfigure(dataclasses.replace(m.cfg, **changes).validate(label))
    return model
