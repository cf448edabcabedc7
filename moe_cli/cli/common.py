"""Shared CLI plumbing: consoles, the MoeError -> exit 2 handler, small option parsers."""

from __future__ import annotations

import functools
import os
import sys

import typer
import yaml
from rich.console import Console

from moe_cli.errors import ConfigError, MoeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# set by the root callback
STATE = {"quiet": False, "device": None, "seed": 0}


def say(*args, **kwargs) -> None:
    """Print unless --quiet."""
    if not STATE["quiet"]:
        console.print(*args, **kwargs)


def fail(message: str, code: int = 2):
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
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


def parse_kv(pairs: list[str] | None, option: str) -> dict:
    """['depth=2', 'img_size=32'] -> {'depth': 2, 'img_size': 32} (values parsed as YAML scalars)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{option} {key}: cannot parse value {value!r}") from None
    return out


def is_tty() -> bool:
    return sys.stdout.isatty()
