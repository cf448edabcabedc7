"""`moe eval CKPT`: accuracy, CE, LPIPS, routing, FLOPs and throughput, as rich tables or one JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from moe_cli.cli.common import (
    STATE,
    CheckpointArg,
    DisableExpertsOpt,
    Precision,
    PrecisionOpt,
    console,
    err_console,
    gflops,
    layer_labels,
    user_errors,
)
from moe_cli.evaluate.report import evaluate, parse_metrics
from moe_cli.io.sources import open_checkpoint
from moe_cli.moe.config import flag
from moe_cli.runtime import pick_device
from moe_cli.tasks import TASKS, Task, metric_names, task_class


def _metric_help() -> str:
    defaults = "; ".join(f"{name}: {t.default_metrics.replace(',', ', ')}" for name, t in TASKS.items())
    return f"Comma list of: {', '.join(metric_names())}. Default by task: {defaults}."


@user_errors
def eval_cmd(
    ckpt: CheckpointArg,
    data: str | None = typer.Option(None, help="digits, lm-synthetic (built in), an ImageFolder or token folder, "
                                    "hfds/NAME[:FOLDER] (default: the data the checkpoint was trained on).",
                                    show_default=False),
    metric: str | None = typer.Option(None, help=_metric_help(), show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    batch_size: int = typer.Option(64, min=1, help="Evaluation batch size."),
    precision: PrecisionOpt = Precision.fp32,
    top_k: int | None = typer.Option(None, help="Route each token to K experts instead of the trained k."),
    capacity_factor: float | None = typer.Option(None, help="Capacity factor for token dropping at eval."),
    disable_experts: DisableExpertsOpt = None,
    decoder: str | None = typer.Option(None, help="Token tasks: token decoder module:function (or file.py:"
                                       "function) for lpips. Executes that code."),
    trust_checkpoint_code: bool = typer.Option(False, "--trust-checkpoint-code", help="Run the decoder the "
                                               "checkpoint names (executes code from its metadata)."),
) -> None:
    """Evaluate a checkpoint; routing overrides show how quality moves when experts change."""
    asked = parse_metrics(metric) if metric is not None else None  # before loading: a typo fails at once
    checkpoint = open_checkpoint(ckpt, top_k, capacity_factor, disable_experts, label=flag)
    task = task_class(checkpoint.task, f"{ckpt}: the task")
    result = evaluate(checkpoint, asked or parse_metrics(task.default_metrics), data, batch_size,
                      pick_device(STATE["device"]), precision.value, decoder, trust_checkpoint_code)
    result["overrides"] = {"top_k": top_k, "capacity_factor": capacity_factor, "disable_experts": disable_experts}
    for warning in result["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    print_tables(result, task)


def _value(r: dict, path: tuple[str, ...]):
    for key in path:
        r = r.get(key) if isinstance(r, dict) else None
    return r


def print_tables(r: dict, task: type[Task]) -> None:
    console.print(f"data: {escape(r['data'])}", soft_wrap=True)
    summary = Table(title=f"moe eval ({Path(r['data']).name or r['data']})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for m in task.metrics:
        value = _value(r, m.path)
        if isinstance(value, float):
            summary.add_row(m.label, f"{value:.2%}" if m.percent else f"{value:.4f}")
    if "flops" in r:
        f = r["flops"]
        dense = f.get("dense")
        key = f"gflops_per_{task.unit}"
        summary.add_row(f"GFLOPs / {task.unit} (active)", gflops(f[key]) +
                        (f"  (dense {gflops(dense[key])})" if dense else ""))
        summary.add_row("params total", f"{f['params_total'] / 1e6:.2f}M" +
                        (f"  (dense {dense['params_total'] / 1e6:.2f}M)" if dense else ""))
        summary.add_row("params active / token", f"{f['params_active'] / 1e6:.2f}M")
    if "throughput" in r:
        t = r["throughput"]
        rate = t[f"{t['unit']}s_per_s"]
        summary.add_row("throughput", f"{rate:.1f} {t['unit']}s/s ({t['device']}, {t['precision']}, batch "
                                      f"{t['batch_size']})")
    console.print(summary)
    for value in r.values():
        if isinstance(value, dict) and "skipped" in value:
            console.print(value["skipped"])
    if r.get("routing"):
        table = Table(title="routing per MoE layer")
        for col in ("layer", "expert load", "experts/token", "entropy", "variation", "dropped"):
            table.add_column(col)
        labels = layer_labels(r["routing"])
        for name, s in r["routing"].items():
            table.add_row(labels[name], " ".join(f"{v:.2f}" for v in s["load"]), f"{s['experts_per_token']:.2f}",
                          f"{s['entropy']:.3f}",
                          f"{s['variation']:.3f}", f"{s['dropped']:.2%}")
        console.print(table)
