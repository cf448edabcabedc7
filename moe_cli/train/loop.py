"""THE shared training loop: device, autocast, accumulation, clipping, schedule, MoE aux losses, periodic eval,
atomic checkpoints with exact resume, torchrun DDP, metrics log. Every training command runs through `train`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from moe_cli.config import Recipe
from moe_cli.data.loaders import ResumableSampler, build_datasets, calibration_batches, make_loader
from moe_cli.errors import CheckpointError, ConfigError, MoeError
from moe_cli.io.checkpoint import Checkpoint, load_checkpoint, save
from moe_cli.io.sources import load_source
from moe_cli.moe.stats import RoutingRecorder
from moe_cli.runtime import atomic_write, autocast, pick_device
from moe_cli.tasks import Task, recipe_task

LAST, FINAL, STATE_FILE = "last", "final", "train_state.pt"


class TrainingDiverged(MoeError):
    exit_code = 1


class Reporter:
    """Receives progress from the loop; the CLI subclasses it to draw with rich. Library code never prints."""

    def start(self, total_steps: int, step: int) -> None: ...
    def log(self, record: dict) -> None: ...
    def evaluated(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class TrainResult:
    step: int
    eval: dict
    out_dir: Path
    final: Path | None
    ckpt: Checkpoint | None = None
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- set-up


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=world)
    return d


def build_model(recipe: Recipe, task: Task | None = None) -> Checkpoint:
    """The recipe's model: its source prepared by the task (MAE wrapper, classifier from an MAE encoder, ...),
    then upcycled when `model.upcycle` is set (for an MAE: the encoder's FFNs)."""
    m = recipe.model
    ckpt = load_source(m.source, pretrained=m.pretrained, arch=m.arch, model_kwargs=m.kwargs)
    ckpt = (task or recipe_task(recipe)).prepare(ckpt, recipe)
    if m.upcycle is not None:
        if ckpt.moe is not None:
            raise ConfigError(f"`model.upcycle` is set but {m.source} is already an MoE checkpoint")
        u = m.upcycle
        calib = calibration_batches(ckpt.model, u.calib, u.calib_batches) if u.router_init != "random" else None
        ckpt.upcycle(u, seed=recipe.train.seed, calibration=calib)
    ckpt.task = recipe.task
    return ckpt


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules exempt through timm's ``no_weight_decay()`` convention (the
    model's own set, and each submodule's, e.g. an MoE layer's stacked biases and hidden norms)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def make_optimizer(recipe: Recipe, params: list[tuple[str, nn.Parameter]],
                   no_decay: set[str] = frozenset()) -> torch.optim.Optimizer:
    """No weight decay on biases, norms, 1-d parameters and the names in ``no_decay`` (timm convention)."""
    o = recipe.optim

    def decays(name: str, p: nn.Parameter) -> bool:
        return p.ndim >= 2 and not name.endswith(".bias") and name not in no_decay

    groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": o.weight_decay},
              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=o.betas)


def lr_lambda(recipe: Recipe, total: int) -> Callable[[int], float]:
    s = recipe.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "constant":
            return 1.0
        t = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def tensorboard_writer(out: Path):
    """A SummaryWriter on <out>/tb when TensorBoard is installed, else None (metrics.jsonl is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# ----------------------------------------------------------------------------------------------- state


def prefetch(loader, device: torch.device):
    """Batches moved to ``device`` one ahead: the next batch's (pinned, non-blocking) copy is queued before the
    current step runs, so the host never waits on it."""
    it = iter(loader)
    nxt = next(it, None)
    while nxt is not None:
        cur = tuple(b.to(device, non_blocking=True) for b in nxt)
        nxt = next(it, None)
        yield cur


def check_finite(first_bad: torch.Tensor, loss: torch.Tensor | None, out: Path,
                 params: list[nn.Parameter] | None = None) -> None:
    """Stop with TrainingDiverged if any loss since the start was not finite, or (``params``, before a checkpoint
    is written) a parameter is: a non-finite checkpoint is never published. One host read."""
    bad = int(first_bad)
    if bad >= 0:
        value = f" (now {loss.item()})" if loss is not None else ""
        reason = f"loss became non-finite at step {bad}{value}"
    elif params and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
        reason = "the weights became non-finite"
    else:
        return
    where = find_last(out)
    keep = f"last good checkpoint: {where}" if where else "no checkpoint was written yet"
    raise TrainingDiverged(f"{reason}; training stopped ({keep})")


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


def save_last(out: Path, ckpt: Checkpoint, state: dict) -> None:
    """Write model + optimizer/scheduler/RNG/data position into a fresh folder, then swap it in for `last`."""
    tmp, last, old = out / f".{LAST}.tmp", out / LAST, out / f".{LAST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save(ckpt, tmp)
    torch.save(state, tmp / STATE_FILE)
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        last.rename(old)
    tmp.rename(last)
    shutil.rmtree(old, ignore_errors=True)


# sections a resumed run must share with the run it continues (the rest, e.g. train.steps, may change)
FIXED_ON_RESUME = ("model", "data", "optim", "task", "mae", "masked_tokens", "genie", "densify")


def read_state(last: Path, recipe: Recipe) -> dict:
    """The training state in ``last``, checked to belong to a run of this recipe; one-line errors otherwise."""
    path = last / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or not a torch file
        raise CheckpointError(f"--resume: {path} cannot be read ({type(e).__name__}); it is damaged — start over "
                              "with --overwrite") from None
    needed = ("optimizer", "scheduler", "scaler", "rng", "step", "epoch", "batch_in_epoch")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise CheckpointError(f"--resume: {path} is not a moe-cli training state")
    old, new = state.get("recipe") or {}, recipe.to_dict()
    for section in FIXED_ON_RESUME:
        if section in old and old[section] != new.get(section):
            field = _first_difference(old[section], new.get(section), section)
            raise ConfigError(f"--resume: `{field}` differs from the run being resumed ({last.parent}); a resumed run "
                              f"keeps its model, data and optimizer — start a new run for that change")
    return state


def _first_difference(a, b, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return where


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


def find_last(out: Path) -> Path | None:
    """`last`, or the previous one if a run was killed in the middle of swapping checkpoints."""
    for name in (LAST, f".{LAST}.old"):
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


# ----------------------------------------------------------------------------------------------- loop


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


@holds_output_lock
def train(
    recipe: Recipe,
    ckpt: Checkpoint | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    task: Task | None = None,
    loss_fn: Callable[[nn.Module, tuple], tuple[torch.Tensor, dict]] | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    out_dir: str | Path | None = None,
    can_resume: bool = True,
) -> TrainResult:
    """Train ``ckpt`` (default: the recipe's model) as the recipe says; returns the final eval.

    ``loss_fn`` replaces the task loss (stages of other methods plug in here); ``trainable`` selects the
    parameters to optimise (others are frozen). The output folder is locked for the run: a second run on it
    stops with a ConfigError. ``can_resume``: whether the caller offers --resume (for the error hint).
    """
    reporter = reporter or Reporter()
    t = recipe.train
    dev = pick_device(device)
    dd = init_distributed(dev)
    out = Path(out_dir or recipe.output)
    last = find_last(out) if resume else None
    if resume and last is None:
        raise ConfigError(f"--resume: no checkpoint to resume in {out} (expected {out / LAST}/{STATE_FILE})")
    if not resume and not overwrite and (find_last(out) is not None or (out / FINAL).exists()):
        hint = "pass --resume to continue it or --overwrite to start over" if can_resume else \
            "pass --overwrite to start over"
        raise ConfigError(f"{out} already holds a run; {hint}")
    state = read_state(last, recipe) if last is not None else None
    if not resume and dd.main:
        clear_run(out)  # --overwrite: nothing of the old run survives to be resumed or appended to

    task = task or recipe_task(recipe)
    torch.manual_seed(t.seed)  # same initial model on every rank
    if last is not None:
        ckpt = load_checkpoint(last)
    elif ckpt is None:
        ckpt = build_model(recipe, task)
    torch.manual_seed(t.seed + dd.rank)  # per-rank dropout / noise
    random.seed(t.seed + dd.rank)
    loss_fn = loss_fn or task.loss

    model = ckpt.model.to(dev).train()
    train_ds, val_ds = build_datasets(recipe.data, model)
    sampler = ResumableSampler(train_ds, seed=t.seed, rank=dd.rank, world=dd.world)
    batches_per_epoch = math.ceil(len(sampler) / t.batch_size)
    total = t.steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))

    named = [(n, p) for n, p in model.named_parameters() if trainable is None or trainable(n, p)]
    for n, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(n, p))
    optimizer = make_optimizer(recipe, named, no_weight_decay_names(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total))
    scaler = torch.amp.GradScaler(dev.type, enabled=t.precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"--resume: {last / STATE_FILE} does not fit this run's optimizer "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if dd.main:
            trim_metrics(out / "metrics.jsonl", step)  # the steps after the checkpoint are replayed
        set_rng_state(state["rng"][min(dd.rank, len(state["rng"]) - 1)])
        reporter.message(f"resumed from {last} at step {step}")

    train_model = model
    if dd.world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        train_model = torch.compile(train_model, backend=t.compile_backend)
    val_loader = make_loader(val_ds, t.batch_size * 2, None, recipe.data.num_workers, dev)
    val_loader.generator = torch.Generator().manual_seed(0)  # keep the global RNG untouched by eval

    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []

    tb = tensorboard_writer(out) if dd.main else None

    def record(rec: dict) -> None:
        history.append(rec)
        if dd.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if tb is not None:
            for key, value in rec.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    tb.add_scalar(f"{rec['split']}/{key}", value, rec["step"])

    def checkpoint_state() -> dict:
        rngs = [rng_state()]
        if dd.world > 1:
            gathered: list = [None] * dd.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "recipe": recipe.to_dict()}

    def evaluate() -> dict:
        res = task.evaluate(model, val_loader, dev, t.precision) if dd.main else {}
        rec = {"step": step, "split": "val", **res}
        if dd.main:
            record(rec)
            reporter.evaluated(rec)
        return rec

    recorder = RoutingRecorder(model, aux=True)  # aux losses and routing statistics of each training forward
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step whose loss was not finite
    reporter.start(total, step)
    last_eval: dict = {}
    window_t, window_n = time.perf_counter(), 0
    optimizer.zero_grad(set_to_none=True)
    micro = 0
    while step < total:
        sampler.set_position(epoch, batch_in_epoch * t.batch_size)
        loader = make_loader(train_ds, t.batch_size, sampler, recipe.data.num_workers, dev)
        loader.generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        for batch in prefetch(loader, dev):
            batch_in_epoch += 1
            micro += 1
            sync = micro % t.grad_accum == 0
            ctx = train_model.no_sync() if (dd.world > 1 and not sync) else nullcontext()
            with ctx, autocast(dev, t.precision), recorder:
                loss, logs = loss_fn(train_model, batch)
                aux, aux_logs = recorder.aux_loss(recipe.moe.load_balance, recipe.moe.z_loss)
                total_loss = loss + aux if aux is not None else loss
            # divergence is tracked on the device and read at log / eval / checkpoint steps only (no per-step sync)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total_loss.detach()), step + 1, first_bad)
            scaler.scale(total_loss / t.grad_accum).backward()
            window_n += len(batch[0])
            if not sync:
                continue
            if t.clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for _, p in named], t.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            at_eval = bool(t.eval_every and step % t.eval_every == 0 and step < total)
            at_ckpt = bool(t.ckpt_every and step % t.ckpt_every == 0 and step < total)
            if step % t.log_every == 0 or step == total or at_eval or at_ckpt:
                check_finite(first_bad, total_loss, out, [p for _, p in named] if at_ckpt else None)
            if step % t.log_every == 0 or step == total:
                now = time.perf_counter()
                rec = {"step": step, "split": "train", "loss": total_loss.item(), "lr": scheduler.get_last_lr()[0],
                       "img_s": window_n * dd.world / max(now - window_t, 1e-9),
                       **{k: float(v) for k, v in {**logs, **aux_logs}.items()}}
                imbalance = recorder.imbalance()
                if imbalance is not None:
                    rec["expert_imbalance"] = imbalance.item()
                record(rec)
                reporter.log(rec)
                window_t, window_n = now, 0
            if at_eval:
                last_eval = evaluate()
            if at_ckpt:
                state = checkpoint_state()
                if dd.main:
                    save_last(out, ckpt, state)
            if step >= total:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0

    check_finite(first_bad, None, out, [p for _, p in named])
    last_eval = evaluate()
    final = None
    state = checkpoint_state()
    if dd.main:
        save_last(out, ckpt, state)
        final = save(ckpt, out / FINAL)
        summary = {"step": step, **{k: v for k, v in last_eval.items() if k not in ("step", "split")}}
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    reporter.close()
    if tb is not None:
        tb.close()
    if dd.world > 1:
        dist.barrier()
    return TrainResult(step, last_eval, out, final, ckpt, history)
