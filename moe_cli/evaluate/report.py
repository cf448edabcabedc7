"""`moe eval` as a library: quality, routing, compute and throughput of a checkpoint on a dataset."""

from __future__ import annotations

import statistics
import time

import torch

from moe_cli.data.loaders import val_loader
from moe_cli.errors import ConfigError, MoeError
from moe_cli.io.checkpoint import Checkpoint, create_model
from moe_cli.models.flops import compute_report
from moe_cli.models.lpips import lpips_model
from moe_cli.moe.recorder import routing_stats
from moe_cli.runtime import autocast
from moe_cli.tasks import EVAL_METRICS, eval_data, make_task, metric_names, reporting


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    known = metric_names()
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise ConfigError(f"--metric must be a comma list of {', '.join(known)}; got {spec!r}")
    return names


@torch.no_grad()
def throughput(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str,
               warmup: int = 3, repeats: int = 10) -> float:
    """Images per second of eval-mode forwards: median over ``repeats`` timed batches after ``warmup``."""
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        with autocast(device, precision):
            model(images)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return images.shape[0] / statistics.median(times)


def place(out: dict, path: tuple[str, ...], value) -> None:
    """out[a][b] = value for path (a, b)."""
    for key in path[:-1]:
        out = out.setdefault(key, {})
    out[path[-1]] = value


def evaluate(ckpt: Checkpoint, metrics: list[str], data: str | None = None, batch_size: int = 64,
             device: torch.device | None = None, precision: str = "fp32", decoder: str | None = None,
             trust_checkpoint_code: bool = False) -> dict:
    """The requested metrics for ``ckpt`` on ``data`` (see :func:`data_config`); quality metrics come from the
    checkpoint's task, and those that do not apply to it come back as {"skipped": reason}.

    Code named by the checkpoint (a masked-tokens token decoder) is never imported unless
    ``trust_checkpoint_code``; ``decoder`` (the user's own choice) is."""
    device = device or torch.device("cpu")
    model = ckpt.model.to(device).eval()
    stored = ckpt.task_config.get("decoder")
    config = {**ckpt.task_config, "decoder": decoder or (stored if trust_checkpoint_code else None)}
    task = make_task(ckpt.task, config)
    data_cfg = eval_data(data, ckpt, ckpt.source and f"this checkpoint (from {ckpt.source})" or "this checkpoint")
    loader = val_loader(model, data_cfg, batch_size, device, ckpt.data_config)
    samples = next(iter(loader))[0].to(device)
    out: dict = {"checkpoint": {"source": ckpt.source, "task": ckpt.task,
                                "moe": ckpt.moe.to_dict() if ckpt.moe else None},
                 "data": data_cfg.root or data_cfg.name, "warnings": []}
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        out["warnings"].append(f"{len(bad)} parameter tensor(s) hold NaN or inf (first: {bad[0]}); the metrics "
                               "below are not meaningful")
    asked = {m.name for m in task.metrics}
    for m in metrics:
        if m not in (*asked, *EVAL_METRICS):
            out[m] = {"skipped": f"{m} does not apply: this `{ckpt.task}` checkpoint outputs {task.produces}"
                                 + (f" (tasks that report it: {', '.join(reporting(m))})" if reporting(m) else "")}
    wanted = [m for m in metrics if m in asked]
    lp = None
    if "lpips" in wanted:
        if task.decoder and not config.get("decoder"):
            named = f"the checkpoint names the decoder {stored!r}, which is not run unless you pass --decoder " \
                    f"{stored} or --trust-checkpoint-code (both execute its code)" if stored else \
                "lpips needs a token decoder: pass --decoder module:function (tokens (B,F,H,W) -> images " \
                "(B,F,C,H,W) in [-1, 1]; it executes that code)"
            out["lpips"] = {"skipped": named}
            out["warnings"].append(f"lpips skipped: {named}")
            wanted.remove("lpips")
        else:
            try:
                lp = lpips_model(device)
            except MoeError as e:  # no lpips package or no AlexNet weights: the other metrics still run
                out["lpips"] = {"skipped": str(e)}
                out["warnings"].append(f"lpips skipped: {e}")
                wanted.remove("lpips")
    if wanted:
        q = task.evaluate(model, loader, device, precision, lpips=lp)
        for metric in task.metrics:
            if metric.name in wanted and metric.key in q:
                place(out, metric.path, q[metric.key])
    if "routing" in metrics:
        out["routing"] = routing_stats(model, loader, device, lambda: autocast(device, precision))
    per = task.inputs_per_sample(samples)  # units (images, clips, tokens) in one sample
    if "flops" in metrics:
        out["flops"] = compute_report(model, samples, task.unit, per)
        if ckpt.moe is not None:
            dense = create_model(ckpt.architecture["name"], ckpt.architecture.get("kwargs", {})).to(device)
            out["flops"]["dense"] = compute_report(dense, samples, task.unit, per)
    if "throughput" in metrics:
        out["throughput"] = {f"{task.unit}s_per_s": throughput(model, samples, device, precision) * per,
                             "unit": task.unit, "batch_size": samples.shape[0], "device": str(device),
                             "precision": precision}
    return out
