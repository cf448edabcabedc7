"""Where the training loop's records go besides metrics.jsonl (always written): TensorBoard and Weights & Biases
(`train.log_to`). Scalars under ``<split>/<key>``; the per-layer routing of a training log step as
``routing/<layer>/{max_load, dropped, entropy}`` and ``routing/<layer>/expert_<e>`` (its share of the load)."""

from __future__ import annotations

from pathlib import Path

from moe_cli.errors import ConfigError

WANDB_EXTRA = "pip install wandb (or pip install -e '.[wandb]')"


def scalars(rec: dict) -> dict[str, float]:
    """A metrics.jsonl record as flat scalar names and values."""
    out = {f"{rec['split']}/{k}": float(v) for k, v in rec.items()
           if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for layer, stats in (rec.get("routing") or {}).items():
        load = stats.get("load") or []
        if load:
            out[f"routing/{layer}/max_load"] = max(load) * len(load)  # busiest expert / mean (1.00: even)
            out.update({f"routing/{layer}/expert_{e}": float(v) for e, v in enumerate(load)})
        for key in ("dropped", "entropy"):
            if key in stats:
                out[f"routing/{layer}/{key}"] = float(stats[key])
    return out


class Loggers:
    """The loggers a run writes to (rank 0 only): TensorBoard when installed, wandb when asked for (its own
    settings: WANDB_MODE=offline, WANDB_PROJECT, ... are honoured)."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict, resume: bool = False):
        self.writers = []
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # optional: metrics.jsonl has everything
            else:
                self.writers.append(SummaryWriter(str(out / "tb")))
        self.wandb = None
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"`train.log_to` wandb needs the optional `wandb` package: {WANDB_EXTRA}") from None
            self.wandb = wandb.init(dir=str(out), config=config, name=out.name, id=_run_id(out), resume="allow"
                                    if resume else None)

    def log(self, rec: dict) -> None:
        values = scalars(rec)
        for w in self.writers:
            for key, value in values.items():
                w.add_scalar(key, value, rec["step"])
        if self.wandb is not None and values:
            self.wandb.log(values, step=rec["step"])

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(out: Path) -> str:
    """One wandb run per output folder (a resumed run continues it)."""
    path = out / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
