"""FLOPs per image as executed (only the experts a token is actually routed to count) and parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moe_cli.moe.layer import moe_layers, op_by_op_dispatch


@torch.no_grad()
def gflops_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """GFLOPs (2 x multiply-adds) per image of one forward over ``images``, counted by torch's FlopCounterMode
    on the ops that really run: a top-k MoE layer counts only the experts its tokens went to (each expert's rows
    through plain linear maps, whichever dispatcher the model runs otherwise)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, op_by_op_dispatch():
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / images.shape[0] / 1e9


def compute_report(model: nn.Module, images: torch.Tensor, unit: str = "image", per: int = 1) -> dict:
    """GFLOPs per sample (`gflops_per_image`) and per ``unit`` of which a sample holds ``per`` (`gflops_per_token`),
    total and active parameters."""
    total, active = param_counts(model)
    flops = gflops_per_image(model, images)
    return {"gflops_per_image": flops, "unit": unit, f"gflops_per_{unit}": flops / per, "params_total": total,
            "params_active": active}


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters active per token): each MoE layer counts only its k used experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.num_experts - m.active_experts) * m.experts.params_per_expert() for _, m in moe_layers(model))
    return total, round(total - inactive)
