"""`moe finetune run.yaml`: the shared training loop on a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_cli.cli.common import STATE, OutputAliasOpt, OutputDirOpt, RecipeArg, SetOpt, console, read_recipe, user_errors
from moe_cli.cli.progress import RichReporter
from moe_cli.errors import ConfigError
from moe_cli.recipe import recipe_chain
from moe_cli.train.loop import train
from moe_cli.train.run_folder import FINAL, find_last


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
    chain = recipe_chain(r, recipe.name)
    if not resume and not overwrite:
        for run in chain[1:]:
            if find_last(Path(run.output)) is not None:
                raise ConfigError(f"{run.output} (a `then` run) already holds a run; pass --resume to continue the "
                                  "chain or --overwrite to start over")
    for i, run in enumerate(chain):
        out = Path(run.output)
        title = run.task if len(chain) == 1 else f"{i + 1}/{len(chain)} {run.task}"
        if resume and (out / "summary.json").is_file() and (out / FINAL).is_dir() and i < len(chain) - 1:
            console.print(f"{title}: {out} is complete, skipping", soft_wrap=True)
            continue
        again = resume and (i == 0 or find_last(out) is not None)
        result = train(run, device=STATE["device"], resume=again, overwrite=overwrite or (resume and not again),
                       reporter=RichReporter(title))
        if result.final is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in result.eval.items()
                              if k not in ("step", "split") and isinstance(v, float))
            console.print(f"{title} final: step {result.step}  {shown}")
            console.print(f"  saved {result.final}", soft_wrap=True)
