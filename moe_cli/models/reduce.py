"""Fewer experts, permanently: prune the least-used ones, or merge similar ones (MC-SMoE style), down to a dense
FFN that plain timm loads.

Both read expert usage from calibration batches: how often each expert is chosen (share of routed pairs) and
its router logits. Merging groups experts around the N most used ones by the correlation of their router
logits, aligns each member's hidden units to the group's dominant expert by a greedy permutation (cosine
similarity of fc1 rows), averages weighted by usage, and keeps the dominant expert's router row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.checks import Label, argument
from moe_cli.errors import ConfigError
from moe_cli.models.overrides import check_layer_indices, parse_disabled
from moe_cli.moe.config import TOKEN_CHOICE, Combine
from moe_cli.moe.experts import PARAMS as EXPERT_PARAMS
from moe_cli.moe.ffn import write_ffn
from moe_cli.moe.layer import MoEMlp, moe_layers
from moe_cli.moe.recorder import RoutingRecorder, load_share
from moe_cli.moe.upcycling import balanced_assign


@torch.no_grad()
def expert_usage(model: nn.Module, batches) -> dict[str, dict]:
    """Per MoE layer: ``share`` (E,) of routed (token, slot) pairs and ``logits`` (N, E) router logits."""
    layers = moe_layers(model)
    shares = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    logits: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    hooks = []
    for name, layer in layers:
        def grab(_m, args, out, name=name):
            logits[name].append(out.logits.detach().float().cpu())
        hooks.append(layer.router.register_forward_hook(grab))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with RoutingRecorder(model) as rec:
            for batch in batches:
                model(batch.to(device))
                for name, _ in layers:
                    shares[name] += rec.records[name].counts.double().cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {n: {"share": load_share(shares[n]).float(), "logits": torch.cat(logits[n])}
           for n, _ in layers}
    for name, u in out.items():
        if not torch.isfinite(u["logits"]).all():
            raise ConfigError(f"`{name}`: the router gives non-finite logits on the calibration data, so expert usage "
                              "cannot be measured; this checkpoint's router is broken")
    return out


def prune(model: nn.Module, keep: int | None = None, drop: str | None = None, usage_of=None,
          label: Label = argument) -> dict[str, list[int]]:
    """Remove experts for good: all but the ``keep`` most used per layer (``usage_of(model)`` measures usage:
    :func:`expert_usage` on calibration batches), or those named in ``drop`` ('layer:expert,...'). Returns the kept
    expert indices per layer; errors name the arguments through ``label``."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("this checkpoint has no MoE layers to prune")
    if (keep is None) == (drop is None):
        raise ConfigError(f"give exactly one of {label('keep')} N and {label('drop_experts')} LAYER:EXPERT,...")
    if drop is not None and not drop.strip():
        raise ConfigError(f"{label('drop_experts')} expects LAYER:EXPERT pairs like 0:1,1:3; got an empty list")
    dropped = parse_disabled(drop, label, "drop_experts") if drop is not None else {}
    check_layer_indices(dropped, len(layers), label("drop_experts"))
    if keep is not None:  # checked before the calibration data is read
        for name, layer in layers:
            if not 1 <= keep <= layer.num_experts:
                raise ConfigError(f"{label('keep')} must be between 1 and {layer.num_experts} (experts in `{name}`), "
                                  f"got {keep}")
    usage = usage_of(model) if keep is not None else None
    kept = {}
    for i, (name, layer) in enumerate(layers):
        E = layer.num_experts
        if keep is not None:
            share = usage[name]["share"]
            order = sorted(range(E), key=lambda e: (-float(share[e]), e))
            chosen = sorted(order[:keep])
        else:
            bad = [e for e in dropped.get(i, ()) if not 0 <= e < E]
            if bad:
                raise ConfigError(f"{label('drop_experts')}: expert {bad[0]} does not exist in `{name}` (0..{E - 1})")
            chosen = [e for e in range(E) if e not in dropped.get(i, set())]
        try:
            layer.select_experts(chosen)
        except ConfigError as e:
            raise ConfigError(f"`{name}`: {e}") from None
        kept[name] = chosen
    return kept


def merge(model: nn.Module, experts: int, usage_of, label: Label = argument) -> dict[str, list[list[int]]]:
    """Merge every MoE layer of ``model`` down to ``experts`` (in place; a top-k above it is lowered to it).
    ``usage_of(model)`` measures expert usage (:func:`expert_usage` on calibration batches) once k is lowered.
    Returns the groups per layer (dominant expert first); a model merged to 1 goes on to :func:`densify`."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("this checkpoint has no MoE layers to merge")
    for name, layer in layers:
        if not 1 <= experts <= layer.num_experts:
            raise ConfigError(f"{label('experts')} must be between 1 and {layer.num_experts} (experts in `{name}`), "
                              f"got {experts}")
        if experts < layer.k and layer.cfg.gate in TOKEN_CHOICE and not is_split(layer):
            layer.reconfigure(k=experts)
    usage = usage_of(model)
    return {name: merge_layer(layer, usage[name], experts, name) for name, layer in layers}


def _align(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A permutation of ``other``'s hidden units (rows) that matches ``reference``'s, greedily by cosine."""
    sim = F.normalize(reference.float(), dim=-1) @ F.normalize(other.float(), dim=-1).T
    return balanced_assign(sim, 1)


def is_split(layer: MoEMlp) -> bool:
    """Experts that are slices of one FFN, added with weight 1 (``--init split``)."""
    return layer.cfg.combine == Combine.sum


@torch.no_grad()
def merge_layer(layer: MoEMlp, usage: dict, n: int, name: str = "") -> list[list[int]]:
    """Merge ``layer``'s experts into ``n``; returns the groups (dominant expert first). Split experts (slices of
    one FFN) are not averaged: they only go back to the one dense FFN, their slices concatenated (:func:`densify`)."""
    E = layer.num_experts
    if is_split(layer):
        if n != 1:
            raise ConfigError(f"`{name}` holds split experts (slices of one FFN, combine: sum): merging "
                              f"them to {n} is not defined; merge to 1 (the dense FFN) or prune instead")
        return [list(range(E))]
    share, logits = usage["share"], usage["logits"]
    dominant = sorted(sorted(range(E), key=lambda e: (-float(share[e]), e))[:n])
    z = logits - logits.mean(0)
    corr = F.normalize(z.T, dim=-1) @ F.normalize(z.T, dim=-1).T  # (E, E) correlation of router logits
    groups = {d: [d] for d in dominant}
    for e in range(E):
        if e not in groups:
            groups[max(dominant, key=lambda d: float(corr[e, d]))].append(e)
    ex = layer.experts
    merged: dict[str, list[torch.Tensor]] = {name: [] for name in EXPERT_PARAMS if getattr(ex, name) is not None}
    for d in dominant:
        members = groups[d]
        w = torch.tensor([float(share[m]) for m in members])
        w = w / w.sum() if w.sum() > 0 else torch.full((len(members),), 1 / len(members))
        acc = {name: torch.zeros_like(getattr(ex, name)[d]) for name in merged}
        for m, wm in zip(members, w.tolist(), strict=True):
            perm = _align(ex.w1[d], ex.w1[m]) if m != d else torch.arange(ex.w1.shape[1])
            perm = perm.to(ex.w1.device)
            for name in merged:
                t = getattr(ex, name)[m]
                t = t[:, perm] if name == "w2" else (t if name == "b2" else t[perm])
                acc[name] += wm * t
        for name in merged:
            merged[name].append(acc[name])
    layer.select_experts(dominant)
    for name, tensors in merged.items():
        getattr(layer.experts, name).data.copy_(torch.stack(tensors))
    return [groups[d] for d in dominant]


def dense_weights(layer: MoEMlp, name: str = "") -> dict[str, torch.Tensor]:
    """The one FFN a layer of one expert, or of split slices (concatenated along the hidden units), stands for."""
    ex = layer.experts
    names = [n for n in EXPERT_PARAMS if getattr(ex, n) is not None]
    if layer.shared is not None:
        raise ConfigError(f"`{name}` has shared experts, which one dense FFN cannot hold besides the routed one")
    if layer.num_experts == 1:
        return {n: getattr(ex, n)[0] for n in names}
    if not is_split(layer):
        raise ConfigError(f"`{name}` still has {layer.num_experts} experts")
    out = {n: torch.cat(list(getattr(ex, n)), dim=0) for n in names if n in ("w1", "b1", "wg", "bg")}
    out["w2"] = torch.cat(list(ex.w2), dim=1)
    if ex.b2 is not None:
        out["b2"] = ex.b2.sum(0)
    return out


@torch.no_grad()
def densify(moe_model: nn.Module, dense_model: nn.Module) -> nn.Module:
    """Copy ``moe_model`` (every MoE layer down to one expert, or split slices) into the dense architecture
    ``dense_model``."""
    layers = dict(moe_layers(moe_model))
    state = {k: v for k, v in moe_model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    missing, unexpected = dense_model.load_state_dict(state, strict=False)
    for name, layer in layers.items():
        write_ffn(dense_model.get_submodule(name), dense_weights(layer, name))
    left = [k for k in missing if not any(k.startswith(n + ".") for n in layers)]
    if left or unexpected:
        raise ConfigError(f"the dense architecture does not match the MoE model outside its MoE layers "
                          f"({(left or unexpected)[0]})")
    return dense_model
