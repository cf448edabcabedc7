"""The `moe` command: root Typer app and global options."""

from __future__ import annotations

import typer

from moe_cli import __version__
from moe_cli.cli import densify as densify_cmd
from moe_cli.cli import eval as eval_cmd
from moe_cli.cli import export as export_cmd
from moe_cli.cli import finetune as finetune_cmd
from moe_cli.cli import inspect as inspect_cmd
from moe_cli.cli import push as push_cmd
from moe_cli.cli import reduce as reduce_cmd
from moe_cli.cli import upcycle as upcycle_cmd
from moe_cli.cli.common import STATE, OneLineErrors

app = typer.Typer(
    name="moe",
    cls=OneLineErrors,
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


app.command("upcycle")(upcycle_cmd.upcycle)
app.command("export")(export_cmd.export)
app.command("finetune")(finetune_cmd.finetune)
app.command("densify-to-sparse")(densify_cmd.densify)
app.command("eval")(eval_cmd.eval_cmd)
app.command("inspect")(inspect_cmd.inspect_cmd)
app.command("merge")(reduce_cmd.merge_cmd)
app.command("prune")(reduce_cmd.prune_cmd)
app.command("push")(push_cmd.push_cmd)


def main() -> None:
    app(prog_name="moe")
