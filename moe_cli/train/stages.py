"""Dense-to-sparse gate distillation (docs/method.md) as stages on top of the shared loop.

Stage 1: dense softmax gate over all experts + the two inverse-CV losses.
Stage 2: new sparse top-k gates, everything else frozen, trained to reproduce the stage-1 routing (KL).
Stage 3: everything unfrozen, fine-tuned with the sparse gate.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_cli.config import DensifyCfg
from moe_cli.data.loaders import val_loader
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, load_checkpoint
from moe_cli.io.sources import load_source
from moe_cli.models.flops import compute_report
from moe_cli.moe.config import ROUTER_STD, MoEConfig
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.losses import expert_cv_loss, token_cv_loss
from moe_cli.moe.recorder import RoutingRecorder, routing_stats
from moe_cli.recipe import Recipe
from moe_cli.runtime import atomic_write, autocast, pick_device
from moe_cli.tasks import unwrap
from moe_cli.tasks.base import Task
from moe_cli.train.build import upcycle_checkpoint
from moe_cli.train.loop import Reporter, train

STAGE_NAMES = {1: "dense", 2: "distill", 3: "finetune"}


def stage_recipe(recipe: Recipe, steps: int, lr: float | None, name: str, **moe_weights) -> Recipe:
    train_cfg = dataclasses.replace(recipe.train, steps=steps, epochs=None)
    optim = dataclasses.replace(recipe.optim, lr=lr if lr is not None else recipe.optim.lr)
    moe = dataclasses.replace(recipe.moe, **moe_weights)
    return dataclasses.replace(recipe, train=train_cfg, optim=optim, moe=moe, output=str(Path(recipe.output) / name))


def dense_moe(recipe: Recipe) -> Checkpoint:
    """Stage 0: the recipe's source upcycled into a soft-gated MoE, or a soft-gated MoE checkpoint as it is."""
    d, m = recipe.densify, recipe.model
    torch.manual_seed(recipe.train.seed)  # the same initial weights (a source without pretrained ones) on every rank
    ckpt = load_source(m.source, pretrained=m.pretrained, arch=m.arch, model_kwargs=m.kwargs)
    if ckpt.moe is None:
        upcycle_checkpoint(ckpt, d.upcycle(), seed=recipe.train.seed)
    elif ckpt.moe.gate != "soft":
        raise ConfigError(f"{m.source} is a `{ckpt.moe.gate}` MoE; stage 1 needs a dense (soft) gate or a dense model")
    for _, layer in moe_layers(ckpt.model):
        layer.reconfigure(router_noise=d.stage1.noise_std)
    return ckpt


def cv_loss(task: Task, token_w: float, expert_w: float, eps: float) -> Callable:
    """Task loss + weighted per-token and per-expert inverse-CV losses, averaged over MoE layers."""

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        with RoutingRecorder(unwrap(model), gates=True) as rec:
            loss, logs = task.loss(model, batch)
        gates = [r.gate for r in rec]
        tok = torch.stack([token_cv_loss(g, eps) for g in gates]).mean()
        exp = torch.stack([expert_cv_loss(g, eps) for g in gates]).mean()
        return loss + token_w * tok + expert_w * exp, {**logs, "token_cv": tok.detach(), "expert_cv": exp.detach()}

    return loss_fn


def sparsify(ckpt: Checkpoint, gate: MoEConfig, seed: int, noise_std: float = 0.0) -> dict[str, torch.Tensor]:
    """Swap every dense gate for a new sparse gate (``gate``: top_k(softmax(W_s x))); returns the old routers'
    weights, the teachers stage 2 distils from (held by the stage, never saved)."""
    gen = torch.Generator().manual_seed(seed + 1)
    teachers = {}
    for name, layer in moe_layers(ckpt.model):
        teachers[name] = layer.router.weight.detach().clone().float()
        with torch.no_grad():
            new = torch.randn(layer.router.weight.shape, generator=gen) * ROUTER_STD
            layer.router.weight.copy_(new.to(layer.router.weight))
        layer.reconfigure(gate=gate.gate, k=gate.k, normalize=gate.normalize, router_noise=noise_std)
    return teachers


def distill_loss(task: Task, teachers: dict[str, torch.Tensor], distill_w: float, task_w: float) -> Callable:
    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        with RoutingRecorder(unwrap(model), aux=True, teachers=teachers) as rec:  # layer names without DDP's
            loss, logs = task.loss(model, batch)
        kl = torch.stack([r.distill for r in rec]).mean()
        return distill_w * kl + task_w * loss, {**logs, "distill_kl": kl.detach()}

    return loss_fn


def is_gate(name: str, _param: nn.Parameter) -> bool:
    return name.endswith(".router.weight")


def trainable_count(model: nn.Module, trainable: Callable | None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if trainable is None or trainable(n, p))


def stage_report(ckpt: Checkpoint, recipe: Recipe, device: torch.device, task: Task) -> dict:
    """The task's quality (accuracy, CE, ...), routing (load per layer, batch-wise variation), GFLOPs per sample and
    per the task's unit (image, token; active experts only) and parameters."""
    model = ckpt.model.to(device).eval()
    loader = val_loader(model, recipe.data, recipe.train.batch_size, device, ckpt.data_config)
    quality = task.evaluate(model, loader, device, recipe.train.precision)
    routes = routing_stats(model, loader, device, lambda: autocast(device, recipe.train.precision))
    samples = next(iter(loader))[0][:16].to(device)
    variation = sum(r["variation"] for r in routes.values()) / max(len(routes), 1)
    return {**quality, "variation": variation, "load": {n: r["load"] for n, r in routes.items()},
            **compute_report(model, samples, task.unit, task.inputs_per_sample(samples))}


def densify_to_sparse(recipe: Recipe, *, from_stage: int = 1, init: str | Path | None = None,
                      device: str | None = None, overwrite: bool = False,
                      reporter: Callable[[str], Reporter] | None = None,
                      on_stage: Callable[[int, str], None] | None = None) -> dict:
    """Run stages ``from_stage``..3; a later start needs ``init``, the checkpoint of the stage before."""
    d: DensifyCfg | None = recipe.densify
    if d is None:
        raise ConfigError("the recipe has no `densify:` section (experts, k, stage1, stage2, stage3)")
    if from_stage not in (1, 2, 3):
        raise ConfigError(f"--from-stage must be 1, 2 or 3, got {from_stage}")
    if from_stage > 1 and init is None:
        raise ConfigError(f"--from-stage {from_stage} needs --init, the stage-{from_stage - 1} checkpoint folder")
    dev = pick_device(device)
    task = recipe.make_task()
    make_reporter = reporter or (lambda _name: Reporter())
    notify = on_stage or (lambda _i, _msg: None)
    out = Path(recipe.output)
    report: dict = {"stages": {}}

    def finish(i: int, ckpt: Checkpoint, trainable: int | None) -> Checkpoint:
        r = stage_report(ckpt, recipe, dev, task)
        r["trainable_params"] = trainable
        report["stages"][STAGE_NAMES[i]] = r
        return ckpt

    if from_stage == 1:
        ckpt = dense_moe(recipe)
        s1 = d.stage1
        res = train(stage_recipe(recipe, s1.steps, s1.lr, "stage1"), ckpt, device=device, overwrite=overwrite,
                    task=task, loss_fn=cv_loss(task, s1.token_cv, s1.expert_cv, s1.cv_eps),
                    reporter=make_reporter("stage 1 dense"), can_resume=False)
        ckpt = finish(1, res.ckpt, trainable_count(res.ckpt.model, None))
    else:
        init = Path(init)
        ckpt = load_checkpoint(init / "final" if (init / "final").is_dir() else init)
        expected = "soft" if from_stage == 2 else "topk"
        if ckpt.moe is None or ckpt.moe.gate != expected:
            raise ConfigError(f"--init {init}: stage {from_stage} starts from a `{expected}`-gated MoE checkpoint "
                              f"(the output of stage {from_stage - 1})")
        finish(from_stage - 1, ckpt, None)

    if from_stage <= 2:
        s2 = d.stage2
        teachers = sparsify(ckpt, d.sparse_gate(), recipe.train.seed, s2.noise_std)
        count = trainable_count(ckpt.model, is_gate)
        notify(2, f"stage 2: training only the {len(moe_layers(ckpt.model))} new gates: {count:,} trainable "
                  f"of {trainable_count(ckpt.model, None):,} parameters")
        res = train(stage_recipe(recipe, s2.steps, s2.lr, "stage2", load_balance=0.0, z_loss=0.0), ckpt,
                    device=device, overwrite=overwrite, task=task,
                    loss_fn=distill_loss(task, teachers, s2.distill, s2.task), trainable=is_gate,
                    reporter=make_reporter("stage 2 distill"), can_resume=False)
        ckpt = finish(2, res.ckpt, count)

    s3 = d.stage3
    res = train(stage_recipe(recipe, s3.steps, s3.lr, "stage3"), ckpt, device=device, overwrite=overwrite,
                task=task, reporter=make_reporter("stage 3 finetune"), can_resume=False)
    for p in res.ckpt.model.parameters():
        p.requires_grad_(True)
    finish(3, res.ckpt, trainable_count(res.ckpt.model, None))
    report["final"] = str(res.final)
    if not dist.is_initialized() or dist.get_rank() == 0:  # one writer: two ranks renaming onto it race
        atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    return report
