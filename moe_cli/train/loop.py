"""THE shared training loop: every training command runs through :func:`train`, read top to bottom.

Set-up (device, torchrun, the run folder, model, data, optimizer) comes from the modules around it:
:mod:`~moe_cli.train.run_folder` (lock, resume, atomic checkpoints), :mod:`~moe_cli.train.optim`,
:mod:`~moe_cli.train.build` and :mod:`moe_cli.runtime`. The step itself: autocast, gradient accumulation, MoE aux
losses from a :class:`~moe_cli.moe.recorder.RoutingRecorder`, clipping, schedule. The host reads losses only at
log / eval / checkpoint steps (divergence is tracked on the device in between).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from moe_cli.data.loaders import ResumableSampler, build_datasets, data_record, make_loader
from moe_cli.errors import CheckpointError, MoeError
from moe_cli.io.checkpoint import Checkpoint, load_checkpoint
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.recorder import RoutingHealth, RoutingRecorder
from moe_cli.recipe import Recipe
from moe_cli.runtime import Parallel, atomic_write, autocast, init_distributed, pick_device
from moe_cli.tasks import Task
from moe_cli.train.build import build_model
from moe_cli.train.loggers import Loggers
from moe_cli.train.meta_build import plan_meta_build
from moe_cli.train.optim import lr_lambda, make_optimizer
from moe_cli.train.parallel import Parallelism, checkpoint_activations, plan
from moe_cli.train.run_folder import (
    BEST,
    FINAL,
    OPTIMIZER_DIR,
    STATE_FILE,
    find_last,
    holds_output_lock,
    keep_history,
    rng_state,
    save_last,
    set_rng_state,
    start_or_resume,
    trim_metrics,
)


class TrainingDiverged(MoeError):
    exit_code = 1


class Reporter:
    """Receives progress from the loop; the CLI subclasses it to draw with rich. Library code never prints."""

    def start(self, total_steps: int, step: int) -> None: ...
    def log(self, record: dict) -> None: ...
    def evaluated(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class TrainResult:
    step: int
    eval: dict
    out_dir: Path
    final: Path | None
    trained: Checkpoint | None = None  # the trained model; None after a sharded run (ckpt reads final/)
    history: list[dict] = field(default_factory=list)

    @functools.cached_property
    def ckpt(self) -> Checkpoint:
        """The trained model, whole, as from a one-process run: a sharded run's is read from final/ when first
        asked for (so that no rank holds the whole model unless a caller needs it)."""
        return self.trained if self.trained is not None else load_checkpoint(self.out_dir / FINAL)


def prefetch(loader, device: torch.device):
    """Batches moved to ``device`` one ahead: the next batch's (pinned, non-blocking) copy is queued before the
    current step runs, so the host never waits on it."""
    it = iter(loader)
    nxt = next(it, None)
    while nxt is not None:
        cur = tuple(b.to(device, non_blocking=True) for b in nxt)
        nxt = next(it, None)
        yield cur


def check_finite(first_bad: torch.Tensor, loss: torch.Tensor | None, out: Path, par: Parallelism,
                 params: list[nn.Parameter] | None = None, metrics: dict | None = None) -> None:
    """Stop with TrainingDiverged (on every rank) if any loss since the start was not finite on any rank, or
    (``params``, before a checkpoint is written) a parameter is, or (``metrics``, before the final model is
    published) an eval metric is: a non-finite model is never published. One host read."""
    if par.dist.world > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    bad = int(first_bad)
    bad_metric = [k for k, v in (metrics or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad >= 0:
        reason = f"loss became non-finite at step {bad}" + (f" (now {loss.item()})" if loss is not None else "")
    elif params and not par.all_finite(params):
        reason = "the weights became non-finite"
    elif bad_metric:
        reason = f"the final evaluation gives a non-finite {bad_metric[0]} ({metrics[bad_metric[0]]})"
    else:
        return
    where = find_last(out)
    keep = f"last good checkpoint: {where}" if where else "no checkpoint was written yet"
    raise TrainingDiverged(f"{reason}; training stopped, nothing published ({keep})")


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
    dd, dev = init_distributed(dev)
    par = plan(recipe, dd, dev)
    out = Path(out_dir or recipe.output)
    last, state = start_or_resume(out, recipe, resume, overwrite, can_resume, dd.main, dd.world)

    # ---- model, data, optimizer
    task = task or recipe.make_task()
    torch.manual_seed(t.seed)  # same initial model on every rank
    # fsdp: the structure only (parameters on meta), each rank filling its own shards after sharding, when the
    # source's weights can be read in slices (moe_cli.train.meta_build); else the whole model on every rank
    meta = plan_meta_build(recipe, task, last) if par.sharded and par.mode == Parallel.fsdp and \
        ckpt is None else None
    if meta is not None:
        ckpt = meta.ckpt
    else:
        ckpt = load_checkpoint(last) if last is not None else ckpt or build_model(recipe, task)
    torch.manual_seed(t.seed + dd.rank)  # per-rank dropout / noise
    random.seed(t.seed + dd.rank)
    loss_fn = loss_fn or task.loss
    model = (ckpt.model if meta is not None else ckpt.model.to(dev)).train()
    train_ds, val_ds = build_datasets(recipe.data, model, ckpt.data_config)
    if last is None:  # what the checkpoints of this run were trained on and how (a resumed one has it already)
        ckpt.extra = {**ckpt.extra, "data": data_record(recipe.data, train_ds),
                      "made_with": [*ckpt.extra.get("made_with", []), {"finetune": recipe.to_dict()}]}
    sampler = ResumableSampler(train_ds, seed=t.seed, rank=dd.rank, world=dd.world)
    total = t.steps or max(1, math.ceil(t.epochs * math.ceil(len(sampler) / t.batch_size) / t.grad_accum))
    for n, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(n, p))
    checkpoint_activations(model, t.activation_checkpointing)  # forwards wrapped in place: names unchanged
    train_model = par.wrap(model, dev)  # DDP wrapper, or the model itself sharded in place (fsdp, experts)
    if meta is not None:
        meta.materialize(model, dev)  # this rank's shards only, read from the source's files
        if dd.main:
            reporter.message(f"built on the meta device and sharded: each process read only its shards of "
                             f"{ckpt.source}")
        if meta.checked and dd.main:
            worst = max(d for _, d in meta.checked)
            reporter.message(f"verify: {len(meta.checked)} upcycled layers each reproduce their dense FFN "
                             f"(max |dense - moe| = {worst:.3e}, layer by layer)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total))
    scaler = torch.amp.GradScaler(dev.type, enabled=t.precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    best = state.get("best") if state is not None else None  # train.keep_best: {metric, value, step}
    best_metric = next((m for m in task.metrics if m.key == t.keep_best), None)
    if state is not None:
        try:
            if "optimizer" in state:  # written by moe-cli 0.2
                optimizer.load_state_dict(state["optimizer"])
            else:
                par.load_optimizer(last / OPTIMIZER_DIR, model, optimizer)
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
    if t.compile:
        train_model = torch.compile(train_model, backend=t.compile_backend)
    val_loader = make_loader(val_ds, t.batch_size * 2, None, recipe.data.num_workers, dev)
    val_loader.generator = torch.Generator().manual_seed(0)  # keep the global RNG untouched by eval

    # ---- logging
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    history: list[dict] = []
    loggers = Loggers(t.log_to, out, recipe.to_dict(), resume=last is not None) if dd.main else None

    def record(rec: dict) -> None:
        history.append(rec)
        if dd.main:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            loggers.log(rec)

    def checkpoint_state() -> dict:
        rngs = [rng_state()]
        if dd.world > 1:
            rngs = [None] * dd.world
            dist.all_gather_object(rngs, rng_state())
        return {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs, "step": step,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world": dd.world, "recipe": recipe.to_dict(),
                "best": best}

    def write_checkpoint(periodic: bool = False) -> None:
        """`last/`: the model (each rank its files of it, :meth:`Parallelism.save_model`), the optimizer (sharded)
        and the training state; a periodic one also kept in `checkpoints/` under ``train.keep_last``. Every rank
        calls it."""
        state = checkpoint_state()
        save_last(out, state, lambda path: par.save_model(ckpt, path, model, max_shard_size=t.max_shard_size),
                  lambda path: par.save_optimizer(path, model, optimizer), dd.main,
                  dist.barrier if dd.world > 1 else lambda: None)
        if periodic and t.keep_last and dd.main:
            keep_history(out, step, t.keep_last)

    def evaluate() -> dict:
        # a sharded model runs its forward on every rank together: each evaluates (the same data)
        run = dd.main or par.sharded
        rec = {"step": step, "split": "val", **(task.evaluate(model, val_loader, dev, t.precision) if run else {})}
        if dd.main:
            record(rec)
            reporter.evaluated(rec)
        if t.keep_best:
            keep_if_best(rec)
        return rec

    def keep_if_best(rec: dict) -> None:
        """`best/`: the model at the best validation ``train.keep_best`` so far (and best.json saying when)."""
        nonlocal best
        value = rec.get(t.keep_best)
        better = isinstance(value, float) and math.isfinite(value) and (
            best is None or (value > best["value"] if best_metric.better else value < best["value"]))
        if dd.world > 1 and par.sharded:  # every rank gathers the model together: rank 0's decision for all
            flag = [better]
            dist.broadcast_object_list(flag, 0)
            better = flag[0]
        if not better:
            return
        par.save_model(ckpt, out / BEST, model, max_shard_size=t.max_shard_size)
        if dd.main:
            best = {"metric": t.keep_best, "value": value, "step": step}
            atomic_write(out / BEST / "best.json", lambda p: Path(p).write_text(json.dumps(best, indent=2)))

    # ---- the loop
    recorder = RoutingRecorder(model, aux=True)  # aux losses and routing statistics of each training forward
    lb_group = dist.group.WORLD if dd.world > 1 else None  # every process trains on its own tokens
    health = RoutingHealth()  # per-layer load, dropped share and entropy, read at log steps; warns on collapse
    balancing = [(n, m) for n, m in moe_layers(model) if m.cfg.balance == "aux_free"]
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step whose loss was not finite
    reporter.start(total, step)
    last_eval: dict = {}
    window_t, window_n, micro = time.perf_counter(), 0, 0
    optimizer.zero_grad(set_to_none=True)
    with recorder:
        while step < total:
            sampler.set_position(epoch, batch_in_epoch * t.batch_size)
            loader = make_loader(train_ds, t.batch_size, sampler, recipe.data.num_workers, dev)
            loader.generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
            for batch in prefetch(loader, dev):
                batch_in_epoch, micro = batch_in_epoch + 1, micro + 1
                sync = micro % t.grad_accum == 0
                with par.no_sync(train_model, sync), autocast(dev, t.precision):
                    loss, logs = loss_fn(train_model, batch)
                    aux, aux_logs = recorder.aux_loss(recipe.moe.load_balance, recipe.moe.z_loss,
                                                      recipe.moe.load_balance_scope, lb_group)
                    total_loss = loss + aux if aux is not None else loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total_loss.detach()), step + 1, first_bad)
                scaler.scale(total_loss / t.grad_accum).backward()
                window_n += len(batch[0]) * task.inputs_per_sample(batch[0])
                if not sync:
                    continue
                par.finish_grads(model)
                if t.clip:
                    scaler.unscale_(optimizer)
                    par.clip_grad_norm_(model, params, t.clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                counts = recorder.take_counts()
                for name, layer in balancing:  # aux-loss-free routers: this step's loads, summed over the ranks
                    if dd.world > 1:
                        dist.all_reduce(counts[name])
                    layer.update_balance(counts[name])
                health.observe(recorder)
                step += 1
                at_log = step % t.log_every == 0 or step == total
                at_eval = bool(t.eval_every and step % t.eval_every == 0 and step < total)
                at_ckpt = bool(t.ckpt_every and step % t.ckpt_every == 0 and step < total)
                if at_log or at_eval or at_ckpt:
                    check_finite(first_bad, total_loss, out, par, params if at_ckpt else None)
                if at_log:
                    now = time.perf_counter()
                    logged = {"loss": total_loss, **logs, **aux_logs}
                    values = torch.stack([torch.as_tensor(v, device=dev).detach().float() for v in logged.values()])
                    if dd.world > 1:  # the mean over the ranks: the global batch's
                        dist.all_reduce(values)
                        values /= dd.world
                    rec = {"step": step, "split": "train", "lr": scheduler.get_last_lr()[0],
                           "speed": window_n * dd.world / max(now - window_t, 1e-9), "unit": task.unit,
                           **dict(zip(logged, values.tolist(), strict=True))}
                    if (imbalance := recorder.imbalance()) is not None:
                        rec["expert_imbalance"] = imbalance.item()
                    rec["routing"], warnings = health.report()
                    record(rec)
                    reporter.log(rec)
                    for text in warnings:
                        record({"step": step, "split": "warning", "message": text})
                        reporter.warning(text)
                    window_t, window_n = now, 0
                if at_eval:
                    last_eval = evaluate()
                if at_ckpt:
                    write_checkpoint(periodic=True)
                if step >= total:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0

    # ---- publish: only a finite model, only after its final evaluation
    check_finite(first_bad, None, out, par, params)
    last_eval = evaluate()
    check_finite(first_bad, None, out, par, metrics=last_eval)
    write_checkpoint()
    final = par.save_model(ckpt, out / FINAL, model, max_shard_size=t.max_shard_size)
    if dd.main:
        summary = {"step": step, **{k: v for k, v in last_eval.items() if k not in ("step", "split")}}
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    reporter.close()
    if loggers is not None:
        loggers.close()
    if dd.world > 1:
        dist.barrier()
    # callers (the next stage) get the whole model, as from a one-process run: after a sharded run, read from final/
    return TrainResult(step, last_eval, out, final, None if par.sharded else ckpt, history)
