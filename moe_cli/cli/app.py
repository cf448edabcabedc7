"""The `moe` command: the root Typer app, its global options, and the commands, imported only when run.

`moe --version`, `moe --help` and a mistyped command never import torch or timm (under half a second): each
command's module is imported when that command (or its --help) runs; the one-line summaries `moe --help`
lists are declared here, once.
"""

from __future__ import annotations

import difflib
import importlib

import typer
import typer.core
import typer.main

from moe_cli import __version__
from moe_cli.cli.base import STATE, OneLineErrors

# name -> (module, function, the one line `moe --help` shows)
COMMANDS = {
    "upcycle": ("moe_cli.cli.upcycle", "upcycle", "Turn a dense model into an MoE, checked equivalent."),
    "finetune": ("moe_cli.cli.finetune", "finetune", "Train a recipe's model (and its `then:` runs)."),
    "densify-to-sparse": ("moe_cli.cli.densify", "densify", "Dense-to-sparse gate distillation in three stages."),
    "eval": ("moe_cli.cli.eval", "eval_cmd", "Accuracy, CE, LPIPS, routing, FLOPs and speed of a model."),
    "inspect": ("moe_cli.cli.inspect", "inspect_cmd", "Figures of a classifier's routing."),
    "export": ("moe_cli.cli.export", "export", "Write one self-describing .safetensors file."),
    "merge": ("moe_cli.cli.reduce", "merge_cmd", "Merge similar experts into fewer (1: a plain timm model)."),
    "prune": ("moe_cli.cli.reduce", "prune_cmd", "Remove the least used (or named) experts for good."),
    "push": ("moe_cli.cli.push", "push_cmd", "Upload a checkpoint and model card to the Hub."),
}


class Command(typer.core.TyperCommand):
    """A command whose help reads as Unix help does: `moe upcycle [OPTIONS] MODEL` (not typer's `{model}`), and
    option types as a user types them (`<int>` followed by the range, not `<int range>`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, typer.core.TyperArgument):
                name = p.display_name_raw
                pieces.append((name if p.required else f"[{name}]") + ("..." if p.nargs != 1 else ""))
        return pieces

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, typer.core.TyperArgument) and p.metavar is None:  # CKPT in usage, list and errors
                p.metavar = p.name.upper()
            if isinstance(p, typer.core.TyperOption) and p.metavar is None:
                shown = p.display_type(ctx) or ""
                if shown.endswith(" range>"):
                    p.metavar = shown.removesuffix(" range>") + ">"
        return params


class LazyCommands(OneLineErrors):
    """The commands of COMMANDS, each built from its module the first time it is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        module, attr, short = COMMANDS[name]
        single = typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False)
        single.command(name, short_help=short, cls=Command)(getattr(importlib.import_module(module), attr))
        return typer.main.get_command(single)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            ctx.fail(f"no command `{name}`{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx, formatter) -> None:
        """The command list from the one-line summaries above, without importing any command."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])


app = typer.Typer(
    name="moe",
    cls=LazyCommands,
    rich_markup_mode=None,
    help="Turn dense transformer checkpoints into Mixture-of-Experts models; train, distil, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)."),
    seed: int = typer.Option(0, help="Global random seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors and final results."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    STATE.update(device=device, seed=seed, quiet=quiet)


def main() -> None:
    app(prog_name="moe")
