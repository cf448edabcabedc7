"""How a torchrun job holds the model: DDP, FSDP2 sharding and expert parallelism, on torch's own engine.

``train.parallel`` and ``train.expert_parallel`` (EP) pick the layout over a ``(dp, ep)`` device mesh of the
W = dp x ep ranks:

- ``ddp``, EP 1: every rank holds the whole model; DistributedDataParallel averages the gradients (as before).
- ``fsdp``: FSDP2 ``fully_shard`` on each transformer block and the root, over all W ranks: parameters, gradients and
  optimizer state are 1/W per rank; under bf16/fp16 AMP the blocks compute in 16 bit and reduce in fp32
  (``MixedPrecisionPolicy``).
- EP N: each MoE layer's experts split over the N ranks of an ``ep`` group (:meth:`MoEMlp.shard_experts
  <moe_cli.moe.layer.MoEMlp.shard_experts>`); the other parameters are replicated (ddp) or sharded (fsdp) over all
  ranks, the expert shards replicated (ddp) or sharded (fsdp) over the dp ranks that hold the same experts.

Gradients are those of the mean loss over the global batch, as one process with the whole batch would get: the
experts' gradients, which the token exchange sums over the ``ep`` group's batches, are averaged over the dp ranks
and divided by N (:meth:`Parallelism.finish_grads`).

Checkpoints: :meth:`Parallelism.save_model` writes the weights in the layout every command reads (one
``model.safetensors``, or Hugging Face's shards + index above ``train.max_shard_size``), a sharded model from the
ranks' shards, each shard file by one rank, never the whole model on one rank; the optimizer state is written
sharded with ``torch.distributed.checkpoint`` (experts as one tensor over all experts), so a run resumes on
another world size or EP degree.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moe_cli.errors import CheckpointError, ConfigError
from moe_cli.io.checkpoint import (
    WEIGHTS_NAME,
    Checkpoint,
    save,
    shard_plan,
    tied_names,
    write_index,
    write_shard,
    write_single,
)
from moe_cli.moe.layer import expert_shards, moe_layers
from moe_cli.recipe import Recipe
from moe_cli.runtime import Dist, Parallel, Precision, parse_size


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the members of each ModuleList / Sequential of two or more modules of one
    class (timm's ``blocks``, GENIE's layers), outermost lists only."""
    blocks, taken = [], []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and len({type(c) for c in m}) == 1 \
                and any(True for _ in m[0].parameters()):
            blocks.extend(m)
            taken.append(name)
    return blocks


def checkpoint_activations(model: nn.Module, mode: str) -> int:
    """Recompute activations in the backward pass instead of keeping them (``train.activation_checkpointing``):
    ``blocks``, each transformer block's (:func:`repeated_blocks`); ``moe``, each MoE layer's; ``none``, nothing.
    The module's forward is wrapped in place (``torch.utils.checkpoint``, non-reentrant, RNG state replayed), so
    parameter names, FSDP2 sharding and checkpoints are unchanged. Returns the number of modules wrapped."""
    from torch.utils.checkpoint import checkpoint

    if mode == "none":
        return 0
    targets = repeated_blocks(model) if mode == "blocks" else [m for _, m in moe_layers(model)]
    for module in targets:
        def forward(*args, _inner=module.forward, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        module.forward = forward
    return len(targets)


@dataclass
class Parallelism:
    """This rank's part of the job's layout (one process: everything whole, nothing to do)."""

    dist: Dist
    mode: Parallel = Parallel.ddp
    ep: int = 1
    precision: Precision = Precision.fp32
    mesh: object | None = None  # DeviceMesh (dp, ep) when sharded
    world_mesh: object | None = None  # DeviceMesh (world,) for fsdp

    @property
    def sharded(self) -> bool:
        """Whether the model is split over ranks (its state dict is not the whole model on any one rank)."""
        return self.mesh is not None

    @property
    def dp(self) -> int:
        return self.dist.world // self.ep

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Split ``model`` (whole, on ``device``) as the layout says; returns the module to train with (the same
        module for fsdp, which shards in place; a DDP wrapper for ddp)."""
        ddp = nn.parallel.DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        if not self.sharded:
            return model if self.dist.world == 1 else ddp(model, device_ids=ids)
        if self.ep > 1:
            for _, layer in moe_layers(model):
                layer.shard_experts(self.mesh["ep"].get_group())
        if self.mode == Parallel.ddp:  # the expert shards differ between ranks: DDP leaves them to finish_grads
            ddp._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_shards(model)))
            return ddp(model, device_ids=ids)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy() if self.precision == Precision.fp32 else \
            MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32)
        if self.ep > 1:
            for _, layer in moe_layers(model):
                fully_shard(layer.experts, mesh=self.mesh["dp"], mp_policy=mp)
        for block in repeated_blocks(model):
            fully_shard(block, mesh=self.world_mesh, mp_policy=mp)
        fully_shard(model, mesh=self.world_mesh, mp_policy=mp)
        return model

    def no_sync(self, train_model: nn.Module, sync: bool):
        """Gradient accumulation: skip the gradient exchange on micro-steps that do not step the optimizer."""
        if self.dist.world == 1 or sync:
            return contextlib.nullcontext()
        if isinstance(train_model, nn.parallel.DistributedDataParallel):
            return train_model.no_sync()
        return _fsdp_no_sync(train_model)

    @torch.no_grad()
    def finish_grads(self, model: nn.Module) -> None:
        """Expert gradients under EP: the token exchange summed them over the ep group's batches; average them over
        the dp replicas (FSDP did, for fsdp) and divide by the EP degree: the mean-loss gradient of the whole batch."""
        if self.ep == 1:
            return
        for _, layer in moe_layers(model):
            for p in layer.experts.parameters():
                if not p.requires_grad:  # frozen (densify stage 2)
                    continue
                if p.grad is None:  # every rank reduces every expert tensor, used or not
                    p.grad = torch.zeros_like(p)
                if isinstance(p.grad, DTensor):  # fsdp: already averaged over dp
                    p.grad.to_local().div_(self.ep)
                    continue
                if self.dp > 1:
                    dist.all_reduce(p.grad, group=self.mesh["dp"].get_group())
                p.grad.div_(self.dist.world)

    def _replicas(self, p: torch.Tensor, expert: bool) -> int:
        """On how many ranks this rank's copy of ``p`` (its local part) lives."""
        shards = p.device_mesh.size() if isinstance(p, DTensor) else 1
        return self.dist.world // shards // (self.ep if expert else 1)

    def _experts(self, model: nn.Module) -> set[int]:
        return {id(p) for _, m in moe_layers(model) if m.expert_shard is not None for p in m.experts.parameters()}

    def clip_grad_norm_(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over all ranks' shards) to ``max_norm``; no host synchronisation."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        experts = self._experts(model)
        grads = [(p.grad, id(p) in experts) for p in params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for g, expert in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            sq = sq + local.float().pow(2).sum() / self._replicas(g, expert)
        dist.all_reduce(sq)
        norm = sq.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g, _ in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
        return norm

    def all_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether every rank's parameters are finite (one host read)."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        ok = torch.stack([torch.isfinite(p.detach()).all() for p in local]).all()
        if self.sharded:
            ok = ok.to(torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    # ------------------------------------------------------------------ checkpoints

    def _whole(self, key: str, t: torch.Tensor, experts: dict[str, range]) -> torch.Tensor:
        """The whole tensor ``key`` on every rank, from the ranks' shards (all ranks must call it)."""
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if key in experts:
            parts = [torch.empty_like(t) for _ in range(self.ep)]
            dist.all_gather(parts, t.contiguous(), group=self.mesh["ep"].get_group())
            t = torch.cat(parts)
        return t

    @torch.no_grad()
    def save_model(self, ckpt: Checkpoint, folder: Path, model: nn.Module,
                   max_shard_size: str | int | None = None) -> Path | None:
        """Write the model's weights into ``folder`` as :func:`~moe_cli.io.checkpoint.save` does (Hugging Face's
        sharded layout above ``max_shard_size``); all ranks call it, rank 0 gets the weights file or the index.
        A sharded model is written from the ranks' shards: the files are planned from the tensors' whole shapes,
        each written by one rank (round robin), which keeps only its own files' tensors, gathered one at a time;
        no rank holds the whole model (unless it fits one file)."""
        if not self.sharded:  # every rank holds the whole model: rank 0 writes it
            if not self.dist.main:
                return None
            tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return save(ckpt, folder, tensors=tensors, max_shard_size=max_shard_size)
        tied = tied_names(model)
        state = {k: t for k, t in model.state_dict().items() if k not in tied}
        experts = expert_shards(model)
        sizes = {k: t.numel() * t.element_size() * (self.ep if k in experts else 1) for k, t in state.items()}
        max_shard = parse_size(max_shard_size)
        split = shard_plan(sizes, max_shard) if max_shard is not None else None
        files = split.filename_to_tensors if split is not None and split.is_sharded else {WEIGHTS_NAME: list(state)}
        owner = {name: i % self.dist.world for i, name in enumerate(files)}
        file_of = {key: name for name, keys in files.items() for key in keys}
        left = {name: len(keys) for name, keys in files.items()}
        meta = ckpt.metadata() if self.dist.main else {}
        mine: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            t = self._whole(key, t, experts)
            name = file_of[key]
            if owner[name] == self.dist.rank:
                mine.setdefault(name, {})[key] = t.detach().contiguous().cpu()
            left[name] -= 1
            if not left[name] and name in mine:  # this rank's file is complete: write it, free it
                part = mine.pop(name)
                if name == WEIGHTS_NAME:
                    write_single(Path(folder), part, meta)
                else:
                    write_shard(Path(folder), name, part)
            del t
        dist.barrier()
        if not self.dist.main:
            return None
        return write_index(Path(folder), meta, split) if WEIGHTS_NAME not in files else Path(folder) / WEIGHTS_NAME

    def _optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state by parameter name; expert entries as one tensor over all experts (a DTensor sharded
        over the ep ranks) so the checkpoint does not depend on the layout."""
        osd = get_optimizer_state_dict(model, optimizer)
        if self.ep > 1:
            for name in sorted(expert_shards(model).keys() & osd["state"].keys()):
                osd["state"][name] = {  # new dicts (osd holds the optimizer's own)
                    key: DTensor.from_local(t.full_tensor() if isinstance(t, DTensor) else t, self.mesh,
                                            [Replicate(), Shard(0)], run_check=False)
                    if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                    for key, t in osd["state"][name].items()}
        return osd

    def save_optimizer(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the optimizer state to the folder ``path``, each rank its own part (all ranks must call it). A
        Ctrl-C while it writes is a KeyboardInterrupt again (torch.distributed.checkpoint wraps it in a
        CheckpointException with every rank's traceback); another failure is one line naming the first."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with _one_process_quiet():
                dcp.save({"optimizer": self._optimizer_state(model, optimizer)}, checkpoint_id=str(path),
                         no_dist=not dist.is_initialized())
        except CheckpointException as e:
            errors = [exc for exc, _trace in e.failures.values()]
            if any(isinstance(exc, KeyboardInterrupt) for exc in errors):
                raise KeyboardInterrupt from None
            first = errors[0] if errors else e
            raise CheckpointError(f"could not write the optimizer state to {path}: {type(first).__name__}: "
                                  f"{str(first).splitlines()[0] if str(first) else ''}") from None

    def load_optimizer(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Read what :meth:`save_optimizer` wrote, whatever layout wrote it, into this rank's part."""
        template = self._optimizer_state(model, optimizer)
        with _one_process_quiet():
            dcp.load({"optimizer": template}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        params = dict(model.named_parameters())
        for name, state in template["state"].items():
            for key, t in state.items():
                if isinstance(t, DTensor) and t.device_mesh is self.mesh:  # an expert entry: back to this rank's form
                    local = t.to_local()
                    p = params[name]
                    state[key] = distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None) \
                        if isinstance(p, DTensor) else local
        set_optimizer_state_dict(model, optimizer, template)


@contextlib.contextmanager
def _one_process_quiet():
    """torch.distributed.checkpoint warns that it assumes one process when there is no process group: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def plan(recipe: Recipe, dd: Dist, device: torch.device) -> Parallelism:
    """This rank's layout for ``recipe`` in the job ``dd``; one-line errors for layouts the job cannot take."""
    t = recipe.train
    if dd.world % t.expert_parallel:
        raise ConfigError(f"train.expert_parallel: {t.expert_parallel} must divide the number of processes "
                          f"({dd.world})")
    p = Parallelism(dd, Parallel(t.parallel), t.expert_parallel, Precision(t.precision))
    if (dd.world > 1 or dist.is_initialized()) and (p.mode == Parallel.fsdp or p.ep > 1):
        from torch.distributed.device_mesh import init_device_mesh

        p.mesh = init_device_mesh(device.type, (dd.world // p.ep, p.ep), mesh_dim_names=("dp", "ep"))
        if p.mode == Parallel.fsdp:
            p.world_mesh = init_device_mesh(device.type, (dd.world,), mesh_dim_names=("world",))
    return p
