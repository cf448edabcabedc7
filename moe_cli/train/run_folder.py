"""A training run's output folder: the exclusive lock, atomic `last/` checkpoints with the training state, the
resume check, clearing an old run, and the metrics log replayed on resume.

Layout: ``<out>/last/`` (model.safetensors + train_state.pt, swapped in atomically), ``<out>/final/``,
``metrics.jsonl``, ``summary.json``, ``recipe.yaml``, ``tb/``, ``.lock``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moe_cli.errors import CheckpointError, ConfigError
from moe_cli.recipe import Recipe
from moe_cli.runtime import atomic_write

LAST, FINAL, STATE_FILE, OPTIMIZER_DIR = "last", "final", "train_state.pt", "optimizer"
BEST, HISTORY = "best", "checkpoints"  # train.keep_best, train.keep_last

# what a resumed run may change; every other recipe field must equal the run it continues, so a new section or
# field is protected by default
MAY_CHANGE_ON_RESUME = ("train.steps", "train.epochs", "train.eval_every", "train.ckpt_every", "train.log_every",
                        "train.compile", "train.compile_backend", "train.parallel", "train.expert_parallel",
                        "train.keep_last", "train.log_to", "train.activation_checkpointing",
                        "train.max_shard_size",
                        "data.num_workers", "schedule", "output", "then")
# train.batch_size may change with the number of processes as long as the global batch (batch_size x processes)
# stays the same: a run resumes on another world size


def lock_output(out: Path):
    """An exclusive lock on ``out`` for this process: two runs writing one folder would interleave everything."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")  # noqa: SIM115 — held for the whole run
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        return handle
    except OSError:
        handle.close()
        raise ConfigError(f"{out} is in use by another run (it holds the lock {out / '.lock'}); wait for it or "
                          "choose another output folder") from None
    return handle


def holds_output_lock(fn):
    """Run ``fn`` (train) holding the exclusive lock on its output folder (rank 0), released however it ends."""

    @functools.wraps(fn)
    def wrapper(recipe: Recipe, *args, out_dir: str | Path | None = None, **kwargs):
        out = Path(out_dir or recipe.output)
        lock = lock_output(out) if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            return fn(recipe, *args, out_dir=out, **kwargs)
        finally:
            if lock is not None:
                lock.close()

    return wrapper


def find_last(out: Path) -> Path | None:
    """`last`, or the previous one if a run was killed in the middle of swapping checkpoints."""
    for name in (LAST, f".{LAST}.old"):
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def start_or_resume(out: Path, recipe: Recipe, resume: bool, overwrite: bool, can_resume: bool,
                    main: bool, world: int = 1) -> tuple[Path | None, dict | None]:
    """(`last` folder, its training state) to resume from, or (None, None) for a fresh run, whose folder is then
    cleared (``--overwrite``: nothing of the old run survives to be resumed or appended to)."""
    last = find_last(out) if resume else None
    if resume and last is None:
        raise ConfigError(f"--resume: no checkpoint to resume in {out} (expected {out / LAST}/{STATE_FILE})")
    if not resume and not overwrite and (find_last(out) is not None or (out / FINAL).exists()):
        hint = "pass --resume to continue it or --overwrite to start over" if can_resume else \
            "pass --overwrite to start over"
        raise ConfigError(f"{out} already holds a run; {hint}")
    if last is None:
        if main:
            clear_run(out)
        return None, None
    return last, read_state(last, recipe, world)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(out: Path, state: dict, write_model: Callable[[Path], None], write_optimizer: Callable[[Path], None],
              main: bool, barrier: Callable[[], None] = lambda: None) -> None:
    """Write the model and the optimizer (each rank its part, through ``write_model`` and ``write_optimizer``) and
    scheduler/RNG/data position into a fresh folder, then swap it in for `last` (rank 0). Every rank calls it."""
    tmp, last, old = out / f".{LAST}.tmp", out / LAST, out / f".{LAST}.old"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_model(tmp)  # first: reading an FSDP2 model's state dict reshards parameters a forward left whole, which
    write_optimizer(tmp / OPTIMIZER_DIR)  # the optimizer's state dict needs
    if main:
        torch.save(state, tmp / STATE_FILE)
        if last.exists():
            shutil.rmtree(old, ignore_errors=True)
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def keep_history(out: Path, step: int, keep: int) -> Path:
    """A copy of `last/` as `checkpoints/step-N/`, the oldest beyond the ``keep`` most recent removed (timm's
    --checkpoint-hist, transformers' save_total_limit). Rank 0 only."""
    target = out / HISTORY / f"step-{step:07d}"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / LAST, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(p for p in (out / HISTORY).iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old)
    return target


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def _may_change(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in MAY_CHANGE_ON_RESUME)


def _differs(key: str, old: dict, new: dict) -> bool:
    """Whether flat key ``key`` of the new recipe changed. A key the old run did not write at all (a field or task
    section an earlier version did not have) does not count; keys only the old run wrote (a task section this
    recipe has no use for) are never looked at."""
    if key in old:
        return old[key] != new[key]
    parts = key.split(".")
    return any(".".join(parts[:i]) in old for i in range(1, len(parts))) or \
        any(k.startswith(key + ".") for k in old)


def read_state(last: Path, recipe: Recipe, world: int = 1) -> dict:
    """The training state in ``last``, checked to belong to a run of this recipe; one-line errors otherwise."""
    path = last / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or not a torch file
        raise CheckpointError(f"--resume: {path} cannot be read ({type(e).__name__}); it is damaged — start over "
                              "with --overwrite") from None
    needed = ("scheduler", "scaler", "rng", "step", "epoch", "batch_in_epoch")
    if not isinstance(state, dict) or any(k not in state for k in needed) or \
            ("optimizer" not in state and not (last / OPTIMIZER_DIR).is_dir()):
        raise CheckpointError(f"--resume: {path} is not a moe-cli training state")
    old, new = _flat(state.get("recipe") or {}), _flat(recipe.to_dict())
    old_world = state.get("world")  # None: written by 0.2.0, which did not record it (the batch must not change)
    old_batch, new_batch = old.get("train.batch_size"), new.get("train.batch_size")
    if old_world is None:
        old_world = world
    if old_batch is not None and old_batch * old_world != new_batch * world:
        raise ConfigError(f"--resume: the global batch (train.batch_size x processes) must stay "
                          f"{old_batch} x {old_world} = {old_batch * old_world} to continue the run in "
                          f"{last.parent}; got {new_batch} x {world}")
    for key in sorted(new):
        if key != "train.batch_size" and not _may_change(key) and _differs(key, old, new):
            raise ConfigError(f"--resume: `{key}` differs from the run being resumed ({last.parent}); a resumed run "
                              f"keeps its recipe except {', '.join(MAY_CHANGE_ON_RESUME)} — start a new run for that "
                              "change")
    return state


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(f"{line}\n" for line in keep)))


def clear_run(out: Path) -> None:
    """Remove what a previous run left in ``out`` (checkpoints, metrics, summary, TensorBoard log)."""
    for name in (LAST, f".{LAST}.old", f".{LAST}.tmp", FINAL, "tb"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)
