"""`moe eval CKPT`: accuracy, CE, LPIPS, routing, FLOPs and throughput, as rich tables or one JSON document."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from moe_cli.cli.common import (
    STATE,
    CheckpointArg,
    DisableExpertsOpt,
    Precision,
    PrecisionOpt,
    console,
    err_console,
    user_errors,
)
from moe_cli.evaluate.report import DEFAULT_METRICS, METRICS, evaluate, parse_metrics
from moe_cli.io.sources import open_checkpoint
from moe_cli.models.overrides import apply_overrides
from moe_cli.runtime import pick_device


@user_errors
def eval_cmd(
    ckpt: CheckpointArg,
    data: str | None = typer.Option(None, help="digits (built in), an ImageFolder folder, or a token folder "
                                    "(default: digits; a masked-tokens checkpoint's own token data)."),
    metric: str | None = typer.Option(None, help="Comma list of: " + ", ".join(METRICS) + ". Default by task: "
                                      + "; ".join(f"{k}: {v.replace(',', ', ')}" for k, v in DEFAULT_METRICS.items())
                                      + ".", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    batch_size: int = typer.Option(64, min=1, help="Evaluation batch size."),
    precision: PrecisionOpt = Precision.fp32,
    top_k: int | None = typer.Option(None, help="Route each token to K experts instead of the trained k."),
    capacity_factor: float | None = typer.Option(None, help="Capacity factor for token dropping at eval."),
    disable_experts: DisableExpertsOpt = None,
    decoder: str | None = typer.Option(None, help="masked-tokens: token decoder module:function (or file.py:"
                                       "function) for lpips. Executes that code."),
    trust_checkpoint_code: bool = typer.Option(False, "--trust-checkpoint-code", help="Run the decoder the "
                                               "checkpoint names (executes code from its metadata)."),
) -> None:
    """Evaluate a checkpoint; routing overrides show how quality moves when experts change."""
    if metric is not None:
        parse_metrics(metric)
    precision = precision.value
    checkpoint = open_checkpoint(ckpt)
    metrics = parse_metrics(metric or DEFAULT_METRICS.get(checkpoint.task, DEFAULT_METRICS["classify"]))
    apply_overrides(checkpoint.model, top_k, capacity_factor, disable_experts)
    result = evaluate(checkpoint, metrics, data, batch_size, pick_device(STATE["device"]), precision, decoder,
                      trust_checkpoint_code)
    result["overrides"] = {"top_k": top_k, "capacity_factor": capacity_factor, "disable_experts": disable_experts}
    for warning in result["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    print_tables(result)


def print_tables(r: dict) -> None:
    summary = Table(title=f"moe eval ({r['data']})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    masked = r["checkpoint"]["task"] == "masked-tokens"
    acc = r.get("accuracy", {})
    if "top1" in acc:
        summary.add_row("masked-token accuracy" if masked else "accuracy top-1", f"{acc['top1']:.2%}")
    if "top5" in acc:
        summary.add_row("accuracy top-5", f"{acc['top5']:.2%}")
    for key, label in (("ce", "masked-token cross-entropy" if masked else "cross-entropy"),
                       ("mse", "reconstruction MSE (masked patches)"), ("mae_loss", "MAE loss"),
                       ("lpips", "LPIPS (AlexNet)")):
        if isinstance(r.get(key), float):
            summary.add_row(label, f"{r[key]:.4f}")
    if "flops" in r:
        f = r["flops"]
        dense = f.get("dense")
        summary.add_row(f"GFLOPs / {'clip' if masked else 'image'} (active)", f"{f['gflops_per_image']:.4f}" +
                        (f"  (dense {dense['gflops_per_image']:.4f})" if dense else ""))
        summary.add_row("params total", f"{f['params_total'] / 1e6:.2f}M" +
                        (f"  (dense {dense['params_total'] / 1e6:.2f}M)" if dense else ""))
        summary.add_row("params active / token", f"{f['params_active'] / 1e6:.2f}M")
    if "throughput" in r:
        t = r["throughput"]
        rate, unit = (t["images_per_s"], "img/s") if "images_per_s" in t else (t["sequences_per_s"], "seq/s")
        summary.add_row("throughput", f"{rate:.1f} {unit} ({t['device']}, {t['precision']}, batch {t['batch_size']})")
    console.print(summary)
    for key in ("accuracy", "ce", "mse", "lpips"):
        if isinstance(r.get(key), dict) and "skipped" in r[key]:
            console.print(r[key]["skipped"])
    if r.get("routing"):
        table = Table(title="routing per MoE layer")
        for col in ("layer", "expert load", "experts/token", "entropy", "variation", "dropped"):
            table.add_column(col)
        for name, s in r["routing"].items():
            table.add_row(name, " ".join(f"{v:.2f}" for v in s["load"]), f"{s['experts_per_token']:.2f}",
                          f"{s['entropy']:.3f}",
                          f"{s['variation']:.3f}", f"{s['dropped']:.2%}")
        console.print(table)
