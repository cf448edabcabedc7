"""`moe finetune run.yaml`: the shared training loop on a recipe."""

from __future__ import annotations

import typer

from moe_cli.cli.common import (
    STATE,
    OutputAliasOpt,
    OutputDirOpt,
    RecipeArg,
    SetOpt,
    console,
    prepare_host,
    read_recipe,
    user_errors,
)
from moe_cli.cli.progress import RichReporter
from moe_cli.train.chain import train_chain


@user_errors
def finetune(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: bool = typer.Option(False, help="Continue the run in the recipe's output folder from `last`."),
    overwrite: bool = typer.Option(False, help="Start over even if the output folder holds a run."),
    out: OutputDirOpt = None,
    output: OutputAliasOpt = None,
) -> None:
    """Train (fine-tune, or from scratch) the recipe's model, then its `then:` runs; each writes last/, final/,
    metrics.jsonl and summary.json in its output folder."""
    r = read_recipe(recipe, set_, out, output)
    prepare_host(r)
    for title, run, result in train_chain(r, recipe.name, device=STATE["device"], resume=resume, overwrite=overwrite,
                                          reporter=RichReporter):
        if result is None:
            console.print(f"{title}: {run.output} is complete, skipping", soft_wrap=True)
        elif result.final is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in result.eval.items()
                              if k not in ("step", "split") and isinstance(v, float))
            console.print(f"{title} final: step {result.step}  {shown}")
            console.print(f"  saved {result.final}", soft_wrap=True)
