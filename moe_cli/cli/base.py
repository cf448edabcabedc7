"""The light part of the CLI (no torch, no timm): consoles, the global state the root options set, one-line
errors, and the click group every command runs under. `moe --version`, `moe --help` and a mistyped command
import only this."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from moe_cli.errors import MoeError

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


def _silent_rank() -> bool:
    """A torchrun rank other than 0 before the processes have joined their group: every rank reads the same recipe
    and options then, so the same error would be printed once per rank; rank 0 says it for all. Errors after the
    group exists may be a rank's own and are printed wherever they happen."""
    if os.environ.get("RANK", "0") in ("", "0"):
        return False
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


SILENT_RANK_GRACE_S = 10.0  # a silent rank outlives rank 0 by up to this: torchrun stops the others when one exits


def fail(message: str, code: int = 2):
    if not _silent_rank():
        error_line(message)
    else:  # rank 0 says it; exiting first would let torchrun stop rank 0 before it has (seen under load)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(SILENT_RANK_GRACE_S)
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
            if "unexpected extra argument" in message and "--set" in (args if args is not None else sys.argv):
                message += "; --set takes KEY=VALUE as one word, e.g. --set optim.lr=3e-4"
            error_line(f"{path}: {message} (see {path} --help)")
            rv = 2
        except typer.Abort:
            error_line("aborted")
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
