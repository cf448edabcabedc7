"""Shared CLI plumbing: consoles, one-line errors (MoeError and usage errors -> exit 2), the options several
commands share (as ``Annotated`` aliases) and the choices (as ``str`` Enums, so ``--help`` lists them)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from moe_cli.errors import ConfigError, MoeError
from moe_cli.runtime import Precision

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# set by the root callback
STATE = {"quiet": False, "device": None, "seed": 0}


def say(*args, **kwargs) -> None:
    """Print unless --quiet."""
    if not STATE["quiet"]:
        console.print(*args, **kwargs)


def error_line(message: str) -> None:
    """The one `error:` line on stderr every bad input gets."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # user text is not markup


def fail(message: str, code: int = 2):
    error_line(message)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn MoeError (bad input) into one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeError as e:
            fail(str(e), code=getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except OSError as e:
            if os.environ.get("MOE_DEBUG"):
                raise
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))

    return wrapper


def is_tty() -> bool:
    return sys.stdout.isatty()


# typer >= 0.25 vendors click as typer._click; older versions use click itself: take the module its errors live in
_usage = sys.modules[typer.BadParameter.__module__]
_NO_ARGS = getattr(_usage, "NoArgsIsHelpError", ())


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad choice, missing argument) as one `error:` line and exit 2, like every
    other bad input, instead of click's boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _NO_ARGS as e:
            typer.echo(e.ctx.get_help())
            rv = 0
        except _usage.UsageError as e:
            path = e.ctx.command_path if e.ctx is not None else "moe"
            message = e.format_message().replace("Value error, ", "")  # typer's pydantic coercion prefix
            error_line(f"{path}: {message} (see {path} --help)")
            rv = 2
        except typer.Abort:
            error_line("aborted")
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


CheckpointArg = Annotated[Path, typer.Argument(help="moe-cli checkpoint folder, .safetensors file or "
                                               "hf-hub:org/name.",
                                               show_default=False)]
RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field, e.g. optim.lr=3e-4 "
                                                  "(repeat).", show_default=False)]
OutputDirOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (overrides the recipe's "
                                                   "`output`).", show_default=False)]
OutputAliasOpt = Annotated[Path | None, typer.Option("--output", hidden=True, help="Old name of --out.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace the output if it exists.")]


def writable(out: Path, overwrite: bool, option: str = "--out") -> Path:
    """The one rule for every writing command: an existing output is refused in one line unless --overwrite."""
    if out.exists() and not overwrite:
        raise ConfigError(f"{option} {out} exists; pass --overwrite to replace it")
    return out
DisableExpertsOpt = Annotated[str | None, typer.Option(help="Switch experts off: LAYER:EXPERT,... (MoE layer "
                                                       "index).", show_default=False)]
PrecisionOpt = Annotated[Precision, typer.Option(help="Autocast precision.")]
