"""`moe eval` as a library: quality, routing, compute and throughput of a checkpoint on a dataset."""

from __future__ import annotations

import statistics
import time

import torch

from moe_cli.data.loaders import val_loader
from moe_cli.errors import ConfigError
from moe_cli.evaluate.flops import compute_report
from moe_cli.evaluate.routing import routing_stats
from moe_cli.io.checkpoint import Checkpoint, create_timm
from moe_cli.train.recipe import DataCfg
from moe_cli.train.tasks import autocast, make_task

METRICS = ("accuracy", "ce", "lpips", "routing", "flops", "throughput")


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ConfigError(f"--metric must be a comma list of {', '.join(METRICS)}; got {spec!r}")
    return names


def data_config(data: str) -> DataCfg:
    """'digits' or a folder (ImageFolder; its `validation`/`val` split if present)."""
    return DataCfg(name="digits") if data == "digits" else DataCfg(name="", root=data)


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


def evaluate(ckpt: Checkpoint, metrics: list[str], data: str = "digits", batch_size: int = 64,
             device: torch.device | None = None, precision: str = "fp32") -> dict:
    device = device or torch.device("cpu")
    model = ckpt.model.to(device).eval()
    loader = val_loader(model, data_config(data), batch_size, device)
    images = next(iter(loader))[0].to(device)
    out: dict = {"checkpoint": {"source": ckpt.source, "task": ckpt.task,
                                "moe": ckpt.moe.to_dict() if ckpt.moe else None}, "data": data}
    if {"accuracy", "ce"} & set(metrics):
        q = make_task(ckpt.task).evaluate(model, loader, device, precision)
        if "accuracy" in metrics:
            out["accuracy"] = {"top1": q["accuracy"], "top5": q["top5"]}
        if "ce" in metrics:
            out["ce"] = q["ce"]
    if "lpips" in metrics:
        out["lpips"] = {"skipped": f"lpips does not apply: this `{ckpt.task}` checkpoint outputs class scores, "
                                   "not images (use an image-producing task: mae or masked-tokens)"}
    if "routing" in metrics:
        out["routing"] = routing_stats(model, loader, device, precision)
    if "flops" in metrics:
        out["flops"] = compute_report(model, images)
        if ckpt.moe is not None:
            dense = create_timm(ckpt.architecture["name"], ckpt.architecture.get("kwargs", {})).to(device)
            out["flops"]["dense"] = compute_report(dense, images)
    if "throughput" in metrics:
        out["throughput"] = {"images_per_s": throughput(model, images, device, precision),
                             "batch_size": images.shape[0], "device": str(device), "precision": precision}
    return out

