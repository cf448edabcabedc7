"""`moe inspect CKPT`: PNG figures of where tokens go, plus routes.json."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_cli.cli.common import (
    STATE,
    CheckpointArg,
    DisableExpertsOpt,
    OverwriteOpt,
    console,
    say,
    user_errors,
    writable,
)
from moe_cli.data.loaders import val_loader
from moe_cli.errors import ConfigError, MoeError
from moe_cli.evaluate.inspect import (
    NO_MOE,
    collect_routes,
    training_load,
    write_figures,
    write_routes_json,
    write_training_load,
)
from moe_cli.io.sources import open_checkpoint
from moe_cli.moe.config import flag
from moe_cli.runtime import pick_device
from moe_cli.tasks import eval_data, task_class


@user_errors
def inspect_cmd(
    ckpt: CheckpointArg,
    data: str | None = typer.Option(None, help="digits (built in), an ImageFolder folder or hfds/NAME (default: "
                                    "the data the checkpoint was trained on).", show_default=False),
    out: Path = typer.Option(Path("inspect"), "--out", "-o", help="Folder for the PNGs and routes.json."),
    images: int = typer.Option(4, min=1, help="Images in the per-patch expert map."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    disable_experts: DisableExpertsOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Expert-load heatmap per layer, routing per class, per-patch expert maps, the load over training (for a
    run's checkpoint), routes.json."""
    writable(out, overwrite)
    checkpoint = open_checkpoint(ckpt, disable_experts=disable_experts, label=flag)
    if not task_class(checkpoint.task, f"{ckpt}: the task").routing_maps:
        raise ConfigError(f"moe inspect maps routing per class and per image patch of classifiers; {ckpt} is a "
                          f"`{checkpoint.task}` checkpoint (use `moe eval {ckpt} --metric routing`)")
    if checkpoint.moe is None:
        raise MoeError(NO_MOE)
    model = checkpoint.model
    device = pick_device(STATE["device"])
    cfg = eval_data(data, checkpoint, str(ckpt))
    loader = val_loader(model, cfg, batch_size, device, checkpoint.data_config)
    say(f"reading {len(loader.dataset)} images from {cfg.root or cfg.name}")
    num_classes = getattr(model, "num_classes", 0) or 1
    routes = collect_routes(model.to(device), loader, device, num_classes, images)
    paths = write_figures(routes, out)
    run = Path(str(ckpt)).parent  # a run folder's final/ or last/: its metrics.jsonl has the load over training
    if (load := training_load(run / "metrics.jsonl")):
        paths.append(write_training_load(load, out / "load_over_training.png"))
    write_routes_json(routes, out / "routes.json")
    for p in [*paths, out / "routes.json"]:
        console.print(f"wrote {p}")
