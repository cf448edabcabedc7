"""`moe push CKPT ORG/NAME`: upload a checkpoint to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_cli.cli.common import CheckpointArg, console, user_errors
from moe_cli.errors import ConfigError
from moe_cli.io.hub import check_repo_id, push, stage


@user_errors
def push_cmd(
    ckpt: CheckpointArg,
    repo_id: Annotated[str, typer.Argument(metavar="ORG/NAME", help="Hub repository (created if missing).",
                                           show_default=False)],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or `hf auth login`).",
                                              show_default=False)] = None,
    dry_run: Annotated[Path | None, typer.Option("--dry-run", metavar="DIR", help="Write the files that would be "
                                                 "uploaded into DIR instead (no network).", show_default=False)] = None,
) -> None:
    """Upload a checkpoint (model, model card, config, eval results, routing figure) to the Hub."""
    check_repo_id(repo_id, "ORG/NAME")
    if dry_run is not None:
        if dry_run.exists() and any(dry_run.iterdir()):
            raise ConfigError(f"--dry-run {dry_run} exists and is not empty; choose a new folder")
        for path in stage(ckpt, repo_id, dry_run):
            console.print(f"would upload {path.name} ({path.stat().st_size / 1e6:.2f} MB)")
        return
    console.print(f"pushed {ckpt} to {push(ckpt, repo_id, private=private, token=token)}")
