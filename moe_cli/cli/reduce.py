"""`moe prune` and `moe merge`: fewer experts for good, from usage on calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moe_cli.cli.common import CheckpointArg, OverwriteOpt, console, say, user_errors, writable
from moe_cli.io.checkpoint import Checkpoint, save
from moe_cli.io.sources import open_checkpoint
from moe_cli.models.flops import param_counts
from moe_cli.moe.config import flag
from moe_cli.train.build import merge_checkpoint, prune_checkpoint

CalibOpt = Annotated[str | None, typer.Option(help="Calibration data for expert usage: digits, lm-synthetic, an "
                                              "image or token folder (default: the checkpoint's own eval data, "
                                              "else digits).", show_default=False)]
CalibBatchesOpt = Annotated[int, typer.Option(min=1, help="Calibration batches of 64 images.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint folder.", show_default=False)]


def _reduce(spec: Path, out: Path, overwrite: bool, title: str, reduce) -> tuple[Checkpoint, Path]:
    """Open the checkpoint, ``reduce(ckpt) -> (ckpt, rows per layer)``, save it to ``out`` and print the report."""
    writable(out, overwrite)
    ckpt = open_checkpoint(spec)
    before = param_counts(ckpt.model)[0]
    ckpt, rows = reduce(ckpt)
    path = save(ckpt, out)
    table = Table(title=title)
    table.add_column("layer")
    table.add_column("kept / groups")
    for name, value in rows.items():
        table.add_row(name, str(value))
    say(table)
    total, active = param_counts(ckpt.model)
    console.print(f"params {before / 1e6:.2f}M -> {total / 1e6:.2f}M (active / token {active / 1e6:.2f}M); "
                  f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)", soft_wrap=True)
    return ckpt, path


@user_errors
def prune_cmd(
    ckpt: CheckpointArg,
    out: OutOpt,
    keep: Annotated[int | None, typer.Option(help="Keep the N most used experts of every MoE layer.",
                                             show_default=False)] = None,
    drop_experts: Annotated[str | None, typer.Option(help="Remove these: LAYER:EXPERT,... (MoE layer index).",
                                                     show_default=False)] = None,
    calib: CalibOpt = None,
    calib_batches: CalibBatchesOpt = 4,
    overwrite: OverwriteOpt = False,
) -> None:
    """Remove experts permanently (a smaller checkpoint), unlike eval's --disable-experts, which only masks."""
    _reduce(ckpt, out, overwrite, "kept experts per layer",
            lambda c: (c, prune_checkpoint(c, keep, drop_experts, calib, calib_batches, label=flag)))


@user_errors
def merge_cmd(
    ckpt: CheckpointArg,
    out: OutOpt,
    experts: Annotated[int, typer.Option("--experts", "-e", help="Experts per layer after merging (1: a dense "
                                         "model plain timm loads).", show_default=False)],
    calib: CalibOpt = None,
    calib_batches: CalibBatchesOpt = 4,
    overwrite: OverwriteOpt = False,
) -> None:
    """Merge similar experts (router-logit similarity, usage-weighted, hidden units aligned) into N per layer."""
    merged, path = _reduce(ckpt, out, overwrite, "merged expert groups per layer",
                           lambda c: merge_checkpoint(c, experts, calib, calib_batches, label=flag))
    if experts == 1:
        arch = merged.architecture
        if arch["name"].startswith("transformers:"):
            console.print(f"a dense {arch['name'].split(':', 1)[1]}: `moe export {path.parent} --format transformers "
                          "--out DIR` writes it as a transformers folder", soft_wrap=True)
        else:
            console.print(f"a plain {arch['name']} checkpoint: timm.create_model({arch['name']!r}, **kwargs)"
                          f".load_state_dict(safetensors.torch.load_file({str(path)!r})) loads it without moe-cli "
                          f"(kwargs: {arch.get('kwargs', {})})", soft_wrap=True)
