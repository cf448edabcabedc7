"""The recipe: its sections (:mod:`moe_cli.config`) plus the task's own section (:mod:`moe_cli.tasks`), loaded from
YAML with every value typed and every rule checked once, in the recipe's words; `--set a.b=value` overrides and
chained `then:` runs.

Each section checks its own fields when it is made; what is checked here is what spans sections: the task is a
registered one, its data is the data it trains on (token formats belong to one task each), exactly one of
`train.steps` / `train.epochs` outside densify-to-sparse, densify only for tasks it applies to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_cli.checks import Origin, in_recipe, labelled, plain
from moe_cli.config import (
    DataCfg,
    DensifyCfg,
    ModelCfg,
    MoELossCfg,
    OptimCfg,
    ScheduleCfg,
    TrainCfg,
    apply_override,
    build,
    parse_assignment,
)
from moe_cli.errors import ConfigError
from moe_cli.tasks import TASKS, Task, data_owner, sections, task_class


@dataclass(frozen=True)
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    moe: MoELossCfg = field(default_factory=MoELossCfg)
    densify: DensifyCfg | None = None  # only for `moe densify-to-sparse`
    task: str = "classify"  # a registered task (moe_cli.tasks.TASKS)
    # the task sections given (`mae:`, `masked_tokens:`, `genie:`, ... at the top of the recipe), by key
    sections: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/run"
    # a follow-up run (e.g. MAE pretraining, then classification): sections given here replace this recipe's,
    # the rest are inherited, and `model.source` defaults to this run's `<output>/final`
    then: dict | None = None

    @property
    def task_type(self) -> type[Task]:
        return task_class(self.task)

    def task_config(self):
        """The task's own section (its defaults when the recipe gives none), or None for a task without one."""
        t = self.task_type
        if t.Config is None:
            return None
        return self.sections.get(t.section) or t.Config()

    def make_task(self) -> Task:
        """The recipe's task, built from its section."""
        return self.task_type(self.task_config(), self.train.label_smoothing)

    def to_dict(self) -> dict:
        """Plain data (choices as their strings): what recipe.yaml and the resume check hold. Task sections sit at
        the top level, as in the YAML: every registered task's (its defaults where the recipe gives none), so a
        resumed run keeps them all."""
        out = {f.name: plain(dataclasses.asdict(getattr(self, f.name))) if dataclasses.is_dataclass(getattr(
            self, f.name)) else plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        for key, cls in sections().items():
            out[key] = plain(dataclasses.asdict(self.sections.get(key) or cls()))
        return out


def check_recipe(r: Recipe, src: str) -> Recipe:
    """The rules that span sections (each section checked its own when it was made)."""
    task = task_class(r.task, f"`task` in {src}")
    if r.densify is None and (r.train.steps is None) == (r.train.epochs is None):
        raise ConfigError(f"{src}: set exactly one of `train.steps` and `train.epochs`")
    if r.densify is not None and not task.distillable:
        raise ConfigError(f"`densify` in {src} trains classifiers; `task` must be one densify-to-sparse applies to "
                          f"({', '.join(n for n, t in TASKS.items() if t.distillable)}), got {r.task!r}")
    if r.train.keep_best is not None and r.train.keep_best not in {m.key for m in task.metrics}:
        raise ConfigError(f"`train.keep_best` in {src} must be a validation metric of task `{task.name}` "
                          f"({', '.join(m.key for m in task.metrics)}), got {r.train.keep_best!r}")
    owner = data_owner(r.data.name)
    if task.data.names and r.data.name not in task.data.names or owner is not None and owner is not task:
        trainer = task if task.data.names else owner
        raise ConfigError(f"{src}: task `{trainer.name}` trains on {trainer.data.help} and only it does "
                          f"(task {r.task!r}, data {r.data.name!r})")
    with labelled(in_recipe("data", src)):
        data = task.default_data(r.data, r.model)
    task.check_data(data, in_recipe("data", src))
    return r if data is r.data else dataclasses.replace(r, data=data)


def recipe_from_dict(data: dict, src: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """The recipe ``data`` (read from ``src``) with the `--set` ``overrides`` applied, built and checked once: an
    error names the field and where its value came from (the file, or the `--set` that gave it)."""
    given = {}
    for assignment in overrides or []:
        given[parse_assignment(assignment, "--set", "optim.lr=3e-4")[0]] = assignment
        data = apply_override(data, assignment)
    return check_recipe(build(Recipe, data, "", Origin(src, given), sections()), src)


def recipe_chain(recipe: Recipe, src: str = "recipe") -> list[Recipe]:
    """The recipe followed by its `then:` runs, each a full validated recipe."""
    chain = [recipe]
    while chain[-1].then is not None:
        parent = chain[-1]
        then = parent.then
        if "output" not in then or then["output"] == parent.output:
            raise ConfigError(f"`then.output` in {src} must name a folder of its own (this run writes {parent.output})")
        if "densify" in then or parent.densify is not None:
            raise ConfigError(f"`then` in {src}: densify-to-sparse recipes cannot be chained")
        data = {k: v for k, v in parent.to_dict().items() if k != "then"}
        data.update(then)
        model = dict(then.get("model") or {})
        model.setdefault("source", str(Path(parent.output) / "final"))
        data["model"] = model
        chain.append(recipe_from_dict(data, f"{src} (then #{len(chain)})"))
        if len(chain) > 8:
            raise ConfigError(f"{src}: more than 8 chained `then` runs")
    return chain


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; ``overrides`` are `--set a.b=value` strings applied first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not a text file (a YAML recipe was expected)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must be a mapping of sections (model, data, optim, ...)")
    return recipe_from_dict(data, path.name, overrides)
