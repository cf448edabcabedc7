"""`moe densify-to-sparse run.yaml`: dense-to-sparse gate distillation, stage by stage."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moe_cli.cli.common import (
    STATE,
    OutputAliasOpt,
    OutputDirOpt,
    RecipeArg,
    SetOpt,
    console,
    gflops,
    layer_labels,
    prepare_host,
    read_recipe,
    say,
    user_errors,
)
from moe_cli.cli.progress import RichReporter
from moe_cli.train.stages import densify_to_sparse


@user_errors
def densify(
    recipe: RecipeArg,
    set_: SetOpt = None,
    from_stage: int = typer.Option(1, help="Start at stage 1 (dense), 2 (gate distillation) or 3 (fine-tune)."),
    init: Path | None = typer.Option(None, help="Checkpoint of the stage before --from-stage (e.g. runs/x/stage1)."),
    overwrite: bool = typer.Option(False, help="Replace stage folders that already hold a run."),
    out: OutputDirOpt = None,
    output: OutputAliasOpt = None,
) -> None:
    """Dense MoE with inverse-CV losses -> sparse gates distilled from the dense gate -> fine-tune."""
    r = read_recipe(recipe, set_, out, output)
    prepare_host(r)
    report = densify_to_sparse(r, from_stage=from_stage, init=init, device=STATE["device"], overwrite=overwrite,
                               reporter=RichReporter, on_stage=lambda _i, msg: say(msg))
    console.print(report_table(report))
    say(load_table(report))
    console.print(f"report: {Path(r.output) / 'report.json'}   final model: {report['final']}", soft_wrap=True)


def report_table(report: dict) -> Table:
    unit = next(iter(report["stages"].values())).get("unit", "image")
    table = Table(title="dense-to-sparse gate distillation", caption=f"var.: batch-wise variation; GFLOPs per "
                  f"{unit}; params total / active / trained in the stage", padding=(0, 1))
    for col in ("stage", "acc.", "CE", "var.", "GFLOPs", "params", "active", "trained"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for name, r in report["stages"].items():
        trainable = f"{r['trainable_params'] / 1e6:.3f}M" if r.get("trainable_params") else "-"
        table.add_row(name, f"{r['accuracy']:.2%}", f"{r['ce']:.3f}", f"{r['variation']:.2f}",
                      gflops(r[f"gflops_per_{unit}"]), f"{r['params_total'] / 1e6:.2f}M",
                      f"{r['params_active'] / 1e6:.2f}M", trainable)
    return table


def load_table(report: dict) -> Table:
    """Fraction of routed tokens per expert, one row per MoE layer, one column per stage."""
    table = Table(title="expert load per layer (fraction of tokens per expert)")
    table.add_column("layer")
    stages = report["stages"]
    for name in stages:
        table.add_column(name)
    layers = next(iter(stages.values()))["load"].keys()
    labels = layer_labels(layers)
    for layer in layers:
        table.add_row(labels[layer], *(" ".join(f"{v:.2f}" for v in r["load"][layer]) for r in stages.values()))
    return table
