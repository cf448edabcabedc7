"""`moe eval CKPT`: accuracy, CE, LPIPS, routing, FLOPs and throughput, as rich tables or one JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from moe_cli.cli.common import STATE, console, user_errors
from moe_cli.errors import ConfigError
from moe_cli.evaluate.report import METRICS, evaluate, parse_metrics
from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.models.overrides import apply_overrides
from moe_cli.train.loop import pick_device


@user_errors
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="moe-cli checkpoint folder or .safetensors file."),
    data: str = typer.Option("digits", help="digits (built in) or an ImageFolder folder."),
    metric: str = typer.Option("accuracy,ce,routing,flops", help="Comma list of: " + ",".join(METRICS)),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    batch_size: int = typer.Option(64, min=1, help="Evaluation batch size."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (autocast)."),
    top_k: int | None = typer.Option(None, help="Route each token to K experts instead of the trained k."),
    capacity_factor: float | None = typer.Option(None, help="Capacity factor for token dropping at eval."),
    disable_experts: str | None = typer.Option(None, help="Switch experts off: LAYER:EXPERT,... (MoE layer index)."),
) -> None:
    """Evaluate a checkpoint; routing overrides show how quality moves when experts change."""
    metrics = parse_metrics(metric)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    checkpoint = load_checkpoint(ckpt)
    apply_overrides(checkpoint.model, top_k, capacity_factor, disable_experts)
    result = evaluate(checkpoint, metrics, data, batch_size, pick_device(STATE["device"]), precision)
    result["overrides"] = {"top_k": top_k, "capacity_factor": capacity_factor, "disable_experts": disable_experts}
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    print_tables(result)


def print_tables(r: dict) -> None:
    summary = Table(title=f"moe eval ({r['data']})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    if "accuracy" in r:
        summary.add_row("accuracy top-1", f"{r['accuracy']['top1']:.2%}")
        summary.add_row("accuracy top-5", f"{r['accuracy']['top5']:.2%}")
    if "ce" in r:
        summary.add_row("cross-entropy", f"{r['ce']:.4f}")
    if "flops" in r:
        f = r["flops"]
        dense = f.get("dense")
        summary.add_row("GFLOPs / image (active)", f"{f['gflops_per_image']:.4f}" +
                        (f"  (dense {dense['gflops_per_image']:.4f})" if dense else ""))
        summary.add_row("params total", f"{f['params_total'] / 1e6:.2f}M" +
                        (f"  (dense {dense['params_total'] / 1e6:.2f}M)" if dense else ""))
        summary.add_row("params active / token", f"{f['params_active'] / 1e6:.2f}M")
    if "throughput" in r:
        t = r["throughput"]
        summary.add_row("throughput", f"{t['images_per_s']:.1f} img/s ({t['device']}, {t['precision']}, "
                                      f"batch {t['batch_size']})")
    console.print(summary)
    if "lpips" in r and "skipped" in r["lpips"]:
        console.print(r["lpips"]["skipped"])
    if r.get("routing"):
        table = Table(title="routing per MoE layer")
        for col in ("layer", "expert load", "entropy", "variation", "dropped"):
            table.add_column(col)
        for name, s in r["routing"].items():
            table.add_row(name, " ".join(f"{v:.2f}" for v in s["load"]), f"{s['entropy']:.3f}",
                          f"{s['variation']:.3f}", f"{s['dropped']:.2%}")
        console.print(table)
