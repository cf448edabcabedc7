"""Shared CLI pieces of the commands: the options several commands share (as ``Annotated`` aliases), the one output
rule, and (re-exported from :mod:`moe_cli.cli.base`) consoles and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_cli.cli.base import (  # noqa: F401  (the plumbing every command module takes from here)
    STATE,
    OneLineErrors,
    console,
    err_console,
    error_line,
    fail,
    is_tty,
    say,
    user_errors,
)
from moe_cli.errors import ConfigError
from moe_cli.runtime import Precision, pick_device, reuse_freed_memory

CheckpointArg = Annotated[Path, typer.Argument(help="moe-cli checkpoint folder, .safetensors file or "
                                               "hf-hub:org/name.",
                                               show_default=False)]
RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe field, "
                                                  "e.g. optim.lr=3e-4 (repeat).", show_default=False)]
OutputDirOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (overrides the recipe's "
                                                   "`output`).", show_default=False)]
OutputAliasOpt = Annotated[Path | None, typer.Option("--output", hidden=True, help="Old name of --out.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace the output if it exists.")]

DisableExpertsOpt = Annotated[str | None, typer.Option(help="Switch experts off: LAYER:EXPERT,... (MoE layer "
                                                       "index).", show_default=False)]
PrecisionOpt = Annotated[Precision, typer.Option(help="Autocast precision.")]


def writable(out: Path, overwrite: bool, option: str = "--out") -> Path:
    """The one rule for every writing command: an existing output is refused in one line unless --overwrite."""
    if out.exists() and not overwrite:
        raise ConfigError(f"{option} {out} exists; pass --overwrite to replace it")
    return out


def read_recipe(path: Path, set_: list[str] | None, out: Path | None, alias: Path | None):
    """The recipe of a training command: the YAML file with its --set assignments, then --out (or its old name
    --output) as the recipe's `output`."""
    from moe_cli.recipe import load_recipe

    folder = out or alias
    return load_recipe(path, (set_ or []) + ([f"output={folder}"] if folder else []))


def layer_labels(names) -> dict[str, str]:
    """Short labels for MoE layer names in tables: the dotted prefix all layers share is dropped but for its last
    part (`lm.model.layers.0.mlp` -> `layers.0.mlp`; timm's `blocks.0.mlp` stays as it is)."""
    names = list(names)
    if not names:
        return {}
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 2 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {n: ".".join(p[max(common - 1, 0):]) for n, p in zip(names, parts, strict=True)}


def gflops(value: float) -> str:
    return f"{value:.4f}" if value >= 0.01 else f"{value:.3g}"  # a tiny LM's per-token figure keeps 3 digits


def prepare_host(recipe) -> None:
    """What a training command sets up in its own process before it trains: on the CPU, unless the recipe says
    `train.reuse_host_memory: false`, freed memory is kept for the next step (not on a GPU host)."""
    if recipe.train.reuse_host_memory and pick_device(STATE["device"]).type == "cpu":
        reuse_freed_memory()
