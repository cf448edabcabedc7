"""`moe finetune run.yaml`: the shared training loop on a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_cli.cli.common import STATE, console, user_errors
from moe_cli.cli.progress import RichReporter
from moe_cli.train.loop import train
from moe_cli.train.recipe import load_recipe


@user_errors
def finetune(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe field: --set optim.lr=3e-4."),
    resume: bool = typer.Option(False, help="Continue the run in the recipe's output folder from `last`."),
    overwrite: bool = typer.Option(False, help="Start over even if the output folder holds a run."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (overrides `output`)."),
) -> None:
    """Train (fine-tune, or from scratch) the recipe's model; writes last/, final/ and metrics.jsonl."""
    r = load_recipe(recipe, (set_ or []) + ([f"output={output}"] if output else []))
    result = train(r, device=STATE["device"], resume=resume, overwrite=overwrite, reporter=RichReporter("finetune"))
    if result.final is not None:
        acc = result.eval.get("accuracy")
        console.print(f"final: step {result.step}  accuracy {acc:.4f}  ce {result.eval.get('ce', float('nan')):.4f}"
                      f"  -> {result.final}", soft_wrap=True)
