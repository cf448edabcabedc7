"""`moe export`: write a checkpoint as one self-describing .safetensors file (optionally cast), or an upcycled
transformers causal LM as its family's native transformers MoE folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_cli.cli.common import CheckpointArg, OverwriteOpt, Precision, console, user_errors, writable
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import save, shard_files
from moe_cli.io.sources import open_checkpoint
from moe_cli.io.transformers_export import export_transformers
from moe_cli.runtime import Choice, describe, parse_size

Format = Choice.of("Format", **{"moe-cli": "one .safetensors file that moe_cli.load rebuilds alone",
                                "transformers": "a folder transformers loads natively (Mixtral, Qwen2-MoE, Qwen3-MoE)"})


@user_errors
def export(
    ckpt: CheckpointArg,
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file or folder (moe-cli), folder "
                             "(transformers)."),
    fmt: Annotated[Format, typer.Option("--format", help=f"What to write. {describe(Format)}.")] =
        Format("moe-cli"),
    dtype: Annotated[Precision, typer.Option(help="Floating-point dtype of the weights (moe-cli format).")] =
        Precision.fp32,
    max_shard_size: Annotated[str | None, typer.Option(help="Write weights above this size (5GB, 500MB) as "
                                                        "Hugging Face's sharded layout (a folder).",
                                                        show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint: one self-describing .safetensors file (or a sharded folder), or a native transformers
    MoE folder."""
    parse_size(max_shard_size)
    if fmt == "transformers":
        if out.suffix == ".safetensors":
            raise ConfigError(f"--format transformers writes a folder; --out {out} is a .safetensors file name")
        writable(out, overwrite)
        checkpoint = open_checkpoint(ckpt)
        source = Path(checkpoint.source) if checkpoint.source and Path(checkpoint.source).is_dir() else None
        path, target, diff = export_transformers(checkpoint, out, source, max_shard_size=max_shard_size)
        console.print(f"verify: max |moe-cli - transformers {target}| = {diff:.3e} on a probe batch ok")
        console.print(f"exported {path} ({target}; transformers.AutoModelForCausalLM.from_pretrained loads it)",
                      soft_wrap=True)
        return
    dtype = dtype.value
    if out.suffix != ".safetensors" and max_shard_size is None:
        raise ConfigError(f"--out must be a .safetensors file (or a folder with --max-shard-size), got {out}")
    writable(out, overwrite)
    checkpoint = open_checkpoint(ckpt)
    path = save(checkpoint, out, dtype=dtype, max_shard_size=max_shard_size)
    files = shard_files(path)
    size = sum(f.stat().st_size for f in files) / 1e6
    console.print(f"exported {path} ({dtype}, {size:.1f} MB" + (f" in {len(files)} shards)" if len(files) > 1 else ")"),
                  soft_wrap=True)
