"""Data-driven router initialisation: the inputs each FFN sees on calibration data, and routers fitted to them."""

from __future__ import annotations

import torch
from torch import nn

from moe_cli.checks import Label, argument
from moe_cli.moe.dispatch import expert_counts
from moe_cli.moe.ffn import token_view
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.recorder import load_share
from moe_cli.moe.upcycling import activation_router, kmeans_router


@torch.no_grad()
def capture_inputs(model: nn.Module, names: tuple[str, ...], batches, max_tokens: int = 8192) -> dict:
    """The input tokens (N, D) of each named module over ``batches`` (forward pre-hooks), up to ``max_tokens``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name, view):
        def fn(_module, args):
            x = view(args[0])
            seen[name].append(x.reshape(-1, x.shape[-1]).detach().float().cpu())
        return fn

    handles = []
    for n in names:
        module = model.get_submodule(n)
        handles.append(module.register_forward_pre_hook(hook(n, token_view(module))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.to(device))
            if sum(t.shape[0] for t in seen[names[0]]) >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v)[:max_tokens] for n, v in seen.items()}


@torch.no_grad()
def init_routers(model: nn.Module, tokens: dict, method: str, seed: int = 0,
                 label: Label = argument) -> dict[str, list[float]]:
    """Set each MoE layer's router from its input ``tokens`` (kmeans centres, or fitted to the most active split
    slice) and return the initial expert load per layer on those tokens."""
    gen = torch.Generator().manual_seed(seed)
    load = {}
    for name, layer in moe_layers(model):
        x = tokens[name]
        if method == "kmeans":
            rows = kmeans_router(x, layer.num_experts, gen, label=label)
        else:
            with torch.enable_grad():
                rows = activation_router(x, layer)
        layer.router.weight.copy_(rows.to(layer.router.weight))
        routing = layer.router.eval()(x.to(layer.router.weight.device))
        load[name] = load_share(expert_counts(routing.expert, layer.num_experts)[1:].float()).tolist()
    return load
