"""`moe eval` as a library: quality, routing, compute and throughput of a checkpoint on a dataset."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from moe_cli.config import DataCfg, section_from
from moe_cli.data.loaders import val_loader
from moe_cli.errors import ConfigError, MoeError
from moe_cli.io.checkpoint import Checkpoint, create_timm
from moe_cli.models.flops import compute_report
from moe_cli.moe.stats import routing_stats
from moe_cli.runtime import autocast
from moe_cli.tasks import TASK_TYPES, make_task
from moe_cli.tasks.lpips import lpips_model

METRICS = ("accuracy", "ce", "mse", "lpips", "routing", "flops", "throughput")
DEFAULT_METRICS = {name: t.default_metrics for name, t in TASK_TYPES.items()}


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ConfigError(f"--metric must be a comma list of {', '.join(METRICS)}; got {spec!r}")
    return names


# token tasks: the data they read, their default validation split, and what --data must hold
TOKEN_DATA = {"masked-tokens": ("tokens", "validation", "a folder with validation.json"),
              "genie": ("genie", "val_v1.1", "the folder holding val_v1.1/")}


def data_config(data: str | None, ckpt: Checkpoint | None = None) -> DataCfg:
    """'digits', a token folder (<split>.json), or an image folder (ImageFolder; its `validation`/`val` split if
    present). None: the token folder a masked-tokens checkpoint was trained on, else digits."""
    if data == "digits":
        return DataCfg(name="digits")
    if ckpt is not None and ckpt.task in TOKEN_DATA:
        name, split, what = TOKEN_DATA[ckpt.task]
        tc = ckpt.task_config
        root = data or tc.get("data_root")
        if data is None and (not root or not Path(root).is_dir()):
            raise ConfigError(f"this {ckpt.task} checkpoint was trained on token data at {root}, which is not here; "
                              f"pass --data FOLDER ({what})")
        stored = {"val_split": tc.get("val_split", split), "stride": tc.get("stride", DataCfg.stride)}
        return section_from(DataCfg, {"name": name, "root": root, **stored}, "task_config", "the checkpoint metadata")
    return DataCfg(name="digits") if data is None else DataCfg(name="", root=data)


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
    data_cfg = data_config(data, ckpt)
    loader = val_loader(model, data_cfg, batch_size, device, ckpt.data_config)
    samples = next(iter(loader))[0].to(device)
    out: dict = {"checkpoint": {"source": ckpt.source, "task": ckpt.task,
                                "moe": ckpt.moe.to_dict() if ckpt.moe else None},
                 "data": data_cfg.root or data_cfg.name, "warnings": []}
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        out["warnings"].append(f"{len(bad)} parameter tensor(s) hold NaN or inf (first: {bad[0]}); the metrics "
                               "below are not meaningful")
    quality = [m for m in metrics if m in ("accuracy", "ce", "mse", "lpips")]
    for m in quality:
        if m not in task.quality:
            out[m] = {"skipped": f"{m} does not apply: this `{ckpt.task}` checkpoint outputs {task.produces}"
                                 + (" (use an image-producing task: mae or masked-tokens)" if m == "lpips" else "")}
    wanted = [m for m in quality if m in task.quality]
    lp = None
    if "lpips" in wanted:
        if ckpt.task in ("masked-tokens", "genie") and not config.get("decoder"):
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
        if "accuracy" in wanted:
            out["accuracy"] = {"top1": q["accuracy"], **({"top5": q["top5"]} if "top5" in q else {})}
        for m in ("ce", "mse", "lpips"):
            if m in wanted:
                out[m] = q[m]
        if "loss" in q:
            out["mae_loss"] = q["loss"]
    if "routing" in metrics:
        out["routing"] = routing_stats(model, loader, device, lambda: autocast(device, precision))
    if "flops" in metrics:
        out["flops"] = compute_report(model, samples)
        if ckpt.moe is not None:
            dense = create_timm(ckpt.architecture["name"], ckpt.architecture.get("kwargs", {})).to(device)
            out["flops"]["dense"] = compute_report(dense, samples)
    if "throughput" in metrics:
        unit = "sequences_per_s" if hasattr(model, "token_shape") else "images_per_s"
        out["throughput"] = {unit: throughput(model, samples, device, precision),
                             "batch_size": samples.shape[0], "device": str(device), "precision": precision}
    return out
