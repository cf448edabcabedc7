"""A recipe and its `then:` runs, trained one after the other: what `moe finetune` runs. Under ``resume`` a run
that already finished is skipped and the first unfinished one continues from its `last/`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from moe_cli.errors import ConfigError
from moe_cli.recipe import Recipe, recipe_chain
from moe_cli.train.loop import Reporter, TrainResult, train
from moe_cli.train.run_folder import FINAL, find_last


def titles(chain: list[Recipe]) -> list[str]:
    """How each run of a chain is named in progress lines: its task, numbered when there are several."""
    return [run.task if len(chain) == 1 else f"{i + 1}/{len(chain)} {run.task}" for i, run in enumerate(chain)]


def train_chain(recipe: Recipe, src: str = "recipe", *, device: str | None = None, resume: bool = False,
                overwrite: bool = False, reporter: Callable[[str], Reporter] = lambda _title: Reporter()
                ) -> Iterator[tuple[str, Recipe, TrainResult | None]]:
    """Train ``recipe`` and its `then:` runs in order, yielding (title, run, result) per run (result None: a finished
    run skipped under ``resume``). Without ``resume`` or ``overwrite``, a `then` run whose folder already holds a run
    is refused before anything trains."""
    chain = recipe_chain(recipe, src)
    if not resume and not overwrite:
        for run in chain[1:]:
            if find_last(Path(run.output)) is not None:
                raise ConfigError(f"{run.output} (a `then` run) already holds a run; pass --resume to continue the "
                                  "chain or --overwrite to start over")
    for i, (run, title) in enumerate(zip(chain, titles(chain), strict=True)):
        out = Path(run.output)
        if resume and (out / "summary.json").is_file() and (out / FINAL).is_dir() and i < len(chain) - 1:
            yield title, run, None
            continue
        again = resume and (i == 0 or find_last(out) is not None)
        yield title, run, train(run, device=device, resume=again, overwrite=overwrite or (resume and not again),
                                reporter=reporter(title))
