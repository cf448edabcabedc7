"""Routing statistics per MoE layer over a loader: expert load, routing entropy, batch-wise variation."""

from __future__ import annotations

import torch
from torch import nn

from moe_cli.models.surgery import moe_layers
from moe_cli.moe.losses import batch_variation
from moe_cli.train.tasks import autocast


@torch.no_grad()
def routing_stats(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                  max_batches: int | None = None) -> dict[str, dict]:
    """{layer: {load: [fraction of routed (token, slot) pairs per expert], entropy of the normalised gate,
    batch-wise variation (DESIGN.md §3), dropped: share of tokens with no expert}}."""
    layers = moe_layers(model)
    counts = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    entropy = {n: 0.0 for n, _ in layers}
    variation = {n: 0.0 for n, _ in layers}
    dropped = {n: 0.0 for n, _ in layers}
    tokens, batches = 0, 0
    was_training = model.training
    model.eval()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0].to(device)
        with autocast(device, precision):
            model(x)
        for name, m in layers:
            counts[name] += m.last_counts.double().cpu()
            gate = m.last_gate.float()
            p = gate.reshape(-1, gate.shape[-1])
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            entropy[name] += (-(p * p.clamp_min(1e-12).log()).sum(-1)).sum().item()
            variation[name] += batch_variation(gate).item()
            dropped[name] += float(m.last_dropped)
        tokens += layers[0][1].last_gate[..., 0].numel() if layers else 0
        batches += 1
    model.train(was_training)
    return {name: {"load": (counts[name] / counts[name].sum().clamp_min(1)).tolist(),
                   "entropy": entropy[name] / max(tokens, 1),
                   "variation": variation[name] / max(batches, 1),
                   "dropped": dropped[name] / max(batches, 1)} for name, _ in layers}
