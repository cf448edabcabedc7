"""Routing statistics and aux losses, collected in one explicit place.

An MoE layer's forward computes its output and nothing else. To get aux losses (training) or statistics
(evaluation), run the forward inside a :class:`RoutingRecorder`::

    with RoutingRecorder(model, aux=True) as rec:
        loss = task_loss(model(x))
    loss = loss + rec.aux_loss(load_balance=0.01, z_loss=0.001)
    rec.records["blocks.0.mlp"].counts      # tokens per expert in the last forward

The training loop, the dense-to-sparse stages and ``moe eval`` all read routing this way. Recorders nest (the
dense-to-sparse CV losses ask for gate matrices inside the loop's aux-loss recorder).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_cli.moe.dispatch import expert_counts
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.losses import batch_variation, distill_loss, load_balance_loss, z_loss
from moe_cli.moe.routing import Routing


@dataclass
class LayerRecord:
    """What one MoE layer reported for its last forward."""

    counts: torch.Tensor  # (E,) routed (token, slot) pairs per expert, detached
    dropped: torch.Tensor  # share of tokens with no expert at all (their residual passes through)
    load_balance: torch.Tensor | None = None  # aux losses (with aux=True), differentiable
    z_loss: torch.Tensor | None = None
    distill: torch.Tensor | None = None  # KL from the layer's teacher router (RoutingRecorder teachers=)
    gate: torch.Tensor | None = None  # (batch, tokens, E) combine weights (with gates=True)
    entropy: torch.Tensor | None = None  # mean router entropy over tokens, nats (with aux=True), detached
    probs: torch.Tensor | None = None  # (E,) mean router probability per expert, P_i (with aux=True), differentiable
    choices: torch.Tensor | None = None  # (E + 1,) the router's choices per expert (before a capacity limit drops
    # any), then the number of (token, slot) places, detached: f_i of the load-balance loss (with aux=True)


def load_share(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the routed (token, slot) pairs, from counts per expert (the last dimension)."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def dropped_fraction(routing: Routing) -> torch.Tensor:
    """Share of tokens left without any expert."""
    return (routing.expert < 0).all(dim=-1).float().mean().detach()


def gate_matrix(routing: Routing, num_experts: int) -> torch.Tensor:
    """(T, E) combine weights: row t holds the weight each expert's output gets for token t (0 if not routed)."""
    keep = routing.expert >= 0
    index = routing.expert.clamp(min=0)
    weight = torch.where(keep, routing.weight, torch.zeros_like(routing.weight))
    return weight.new_zeros(routing.expert.shape[0], num_experts).scatter_add(1, index, weight)


class RoutingRecorder:
    """Collects per-layer routing records of the forwards run inside ``with``; ``records`` holds the last one.

    It listens through forward hooks on each layer's router (torch's own mechanism; nothing is stored on the
    layers), registered on entering and removed on leaving. ``teachers`` ({layer name: (E, D) router weight}):
    with ``aux``, each record also holds ``distill``, the KL from the teacher router's softmax to the layer's."""

    def __init__(self, model: nn.Module, aux: bool = False, gates: bool = False,
                 teachers: dict[str, torch.Tensor] | None = None):
        self.aux, self.gates, self.teachers = aux, gates, dict(teachers or {})
        self.layers = moe_layers(model)
        self.records: dict[str, LayerRecord] = {}
        self.step_counts: dict[str, torch.Tensor] = {}  # training forwards' counts since the last take_counts()
        self.step_choices: dict[str, torch.Tensor] = {}  # and their choices (LayerRecord.choices), summed
        self._batch: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for name, m in self.layers:
            if self.gates:  # gate matrices are (batch, tokens, E): the batch size comes from the layer's input
                self._handles.append(m.register_forward_pre_hook(functools.partial(self._layer_input, name)))
            self._handles.append(m.router.register_forward_hook(functools.partial(self._routed, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_input(self, name: str, _layer: nn.Module, args: tuple) -> None:
        if recomputing():
            return
        x = args[0]
        self._batch[name] = x.shape[0] if x.dim() > 1 else 1

    def _routed(self, name: str, router: nn.Module, args: tuple, routing: Routing) -> None:
        # activation checkpointing runs a block's forward again in the backward pass: the same computations run (so
        # the tensors autograd saved match), but nothing is recorded a second time
        again = recomputing()
        tokens = args[0]
        E = router.weight.shape[0]
        counts = expert_counts(routing.expert.detach(), E)[1:]
        rec = LayerRecord(counts=counts, dropped=dropped_fraction(routing))
        if router.training and not again:
            self.step_counts[name] = counts + self.step_counts[name] if name in self.step_counts else counts
        if self.aux:
            choices = counts if routing.chosen is None else expert_counts(routing.chosen, E)[1:]
            rec.load_balance = load_balance_loss(routing, E, choices)
            rec.probs = routing.probs.mean(dim=0)
            rec.choices = torch.cat([choices, choices.new_full((1,), routing.choices.numel())])
            if router.training and not again:
                prev = self.step_choices.get(name)
                self.step_choices[name] = rec.choices if prev is None else prev + rec.choices
            rec.z_loss = z_loss(routing.logits)
            p = routing.probs.detach()
            rec.entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            if name in self.teachers:
                rec.distill = distill_loss(tokens, routing.logits, self.teachers[name].to(tokens.device))
        if self.gates:
            rec.gate = gate_matrix(routing, E).view(self._batch.get(name, 1), -1, E)
        if not again:
            self.records[name] = rec

    def take_counts(self) -> dict[str, torch.Tensor]:
        """Each layer's (token, slot) counts per expert over the training forwards since the last call (a step's
        micro-batches: what aux-loss-free balancing updates from), then starts over."""
        counts, self.step_counts, self.step_choices = self.step_counts, {}, {}
        return counts

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.records.values())

    def aux_loss(self, load_balance: float, z_loss: float, scope: str = "micro_batch",
                 group=None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Weighted load-balance + z-loss averaged over the MoE layers of the last forward, and the unweighted
        means as tensors (``load_balance``, ``z_loss``, ``dropped``) for logging (read them at log steps only).

        ``scope`` says over which tokens f_i (the share of the router's choices per expert) is counted:
        ``micro_batch``, this forward's own; ``global``, the optimizer step's so far (the training forwards since
        the last :meth:`take_counts`, i.e. its micro-batches up to this one) summed over the processes of
        ``group`` with one all-reduce of E + 1 numbers per layer (Qiu et al. 2025, "Demons in the detail";
        Megatron-Core's global_aux_loss). P_i, the mean router probability, is always this forward's: its
        gradient is local, and averaging the processes' gradients gives the one-process gradient of the
        global-batch loss."""
        recs = [(name, r) for name, r in self.records.items() if r.load_balance is not None]
        if not recs:
            return None, {}
        if scope == "global":
            counts = torch.stack([self.step_choices.get(name, r.choices) for name, r in recs]).float()
            if group is not None:
                counts = counts.clone()
                dist.all_reduce(counts, group=group)
            frac = counts[:, :-1] / counts[:, -1:].clamp_min(1)
            lb = torch.stack([r.probs.numel() * (f * r.probs).sum() for f, (_, r) in zip(frac, recs, strict=True)])
            lb = lb.mean()
        else:
            lb = torch.stack([r.load_balance for _, r in recs]).mean()
        z = torch.stack([r.z_loss for _, r in recs]).mean()
        dropped = torch.stack([r.dropped for _, r in recs]).mean()
        return load_balance * lb + z_loss * z, {"load_balance": lb.detach(), "z_loss": z.detach(), "dropped": dropped}

    def imbalance(self) -> torch.Tensor | None:
        """Mean over MoE layers of max/mean tokens per expert (1.0 = perfectly balanced), as a tensor."""
        ratios = []
        for r in self:
            c = r.counts.float()
            ratios.append(torch.where(c.sum() > 0, c.max() / c.mean().clamp_min(1e-12), 1.0))
        return torch.stack(ratios).mean() if ratios else None


@torch.no_grad()
def routing_stats(model: nn.Module, loader, device: torch.device, autocast=None,
                  max_batches: int | None = None) -> dict[str, dict]:
    """{layer: {load: [fraction of routed (token, slot) pairs per expert], entropy of the normalised gate,
    batch-wise variation (docs/method.md), dropped: share of tokens with no expert, experts_per_token: routed
    (token, slot) pairs per token (k for top-k without drops; between 1 and k for top_p)}} over ``loader``.
    ``autocast``: a context factory for the forward (mixed precision)."""
    layers = moe_layers(model)
    counts = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    entropy = {n: 0.0 for n, _ in layers}
    variation = {n: 0.0 for n, _ in layers}
    dropped = {n: 0.0 for n, _ in layers}
    tokens, batches = 0, 0
    was_training = model.training
    model.eval()
    with RoutingRecorder(model, gates=True) as rec:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0].to(device)
            with (autocast() if autocast else nullcontext()):
                model(x)
            for name, _ in layers:
                r = rec.records[name]
                counts[name] += r.counts.double().cpu()
                gate = r.gate.float()
                p = gate.reshape(-1, gate.shape[-1])
                p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
                entropy[name] += (-(p * p.clamp_min(1e-12).log()).sum(-1)).sum().item()
                variation[name] += batch_variation(gate).item()
                dropped[name] += float(r.dropped)
            tokens += rec.records[layers[0][0]].gate[..., 0].numel() if layers else 0
            batches += 1
    model.train(was_training)
    out = {name: {"load": load_share(counts[name]).tolist(),
                  "experts_per_token": float(counts[name].sum()) / max(tokens, 1),
                  "entropy": entropy[name] / max(tokens, 1),
                  "variation": variation[name] / max(batches, 1),
                  "dropped": dropped[name] / max(batches, 1)} for name, _ in layers}
    for name, layer in layers:  # aux-loss-free balancing: the learned selection bias
        if layer.router.selection_bias is not None:
            out[name]["selection_bias"] = layer.router.selection_bias.tolist()
    return out


def recomputing() -> bool:
    """Whether this forward runs inside the backward pass (activation checkpointing recomputing a block). Under
    torch.compile the hooks are traced into the forward graph, which a recompute does not run through Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class RoutingHealth:
    """Watches routing during training, cheaply: each step adds the layers' counts, dropped shares and router
    entropies on the device; at log steps :meth:`report` reads them once and says, per layer, the load share of
    each expert, the dropped share and the entropy over the interval. A layer that keeps an expert under
    1/(10 E) of its load, or drops more than 20% of its tokens, for ``patience`` log intervals in a row gets one
    warning (once per layer and kind)."""

    def __init__(self, patience: int = 3, starve: float = 0.1, max_dropped: float = 0.2):
        self.patience, self.starve, self.max_dropped = patience, starve, max_dropped
        self._sums: dict[str, list] = {}
        self._streak: dict[tuple[str, str], int] = {}
        self._warned: set[tuple[str, str]] = set()

    def observe(self, recorder: RoutingRecorder) -> None:
        for name, r in recorder.records.items():
            if r.entropy is None:
                continue
            acc = self._sums.get(name)
            values = [r.counts.float(), r.dropped, r.entropy, 1]
            self._sums[name] = values if acc is None else [a + v for a, v in zip(acc, values, strict=True)]

    def report(self) -> tuple[dict[str, dict], list[str]]:
        """({layer: {load, dropped, entropy}} over the interval, new warnings); starts a new interval."""
        stats, warnings = {}, []
        for name, (counts, dropped, entropy, n) in self._sums.items():
            load = (counts / counts.sum().clamp_min(1)).tolist()
            stats[name] = {"load": [round(v, 4) for v in load], "dropped": round(float(dropped) / n, 4),
                           "entropy": round(float(entropy) / n, 4)}
            E = len(load)
            starving = [e for e, v in enumerate(load) if v < self.starve / E]
            for kind, bad, text in (
                    ("starve", bool(starving), f"`{name}`: expert(s) {', '.join(map(str, starving))} got under "
                                               f"{100 * self.starve / E:.1f}% of the load"),
                    ("dropped", stats[name]["dropped"] > self.max_dropped,
                     f"`{name}` dropped {100 * stats[name]['dropped']:.0f}% of its tokens")):
                key = (name, kind)
                self._streak[key] = self._streak.get(key, 0) + 1 if bad else 0
                if self._streak[key] >= self.patience and key not in self._warned:
                    self._warned.add(key)
                    warnings.append(f"routing: {text} for {self.patience} log intervals in a row")
        self._sums = {}
        return stats, warnings
