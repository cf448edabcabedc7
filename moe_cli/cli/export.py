"""`moe export`: write a checkpoint as one self-describing .safetensors file, optionally cast."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_cli.cli.common import console, user_errors
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import DTYPES, load_checkpoint, save


@user_errors
def export(
    ckpt: Path = typer.Argument(..., help="moe-cli checkpoint folder or .safetensors file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    dtype: str = typer.Option("fp32", help="Floating-point dtype: fp32, bf16 or fp16."),
) -> None:
    """Export a checkpoint to a single .safetensors file that `moe_cli.load` rebuilds alone."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {out}")
    checkpoint = load_checkpoint(ckpt)
    path = save(checkpoint, out, dtype=None if dtype == "fp32" else dtype)
    console.print(f"exported {path} ({dtype}, {path.stat().st_size / 1e6:.1f} MB)")
