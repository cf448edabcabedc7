"""`moe export`: write a checkpoint as one self-describing .safetensors file, optionally cast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_cli.cli.common import CheckpointArg, OverwriteOpt, Precision, console, user_errors, writable
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import save
from moe_cli.io.sources import open_checkpoint


@user_errors
def export(
    ckpt: CheckpointArg,
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    dtype: Annotated[Precision, typer.Option(help="Floating-point dtype of the weights.")] = Precision.fp32,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint to a single .safetensors file that `moe_cli.load` rebuilds alone."""
    dtype = dtype.value
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {out}")
    writable(out, overwrite)
    checkpoint = open_checkpoint(ckpt)
    path = save(checkpoint, out, dtype=dtype)
    console.print(f"exported {path} ({dtype}, {path.stat().st_size / 1e6:.1f} MB)")
