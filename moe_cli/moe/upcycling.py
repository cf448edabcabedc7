"""How experts and routers start when a dense FFN becomes an MoE layer.

Experts (``init``):

- ``copy`` — every expert is the dense FFN (sparse upcycling); optional N(0, noise_std) noise.
- ``drop`` — Drop-Upcycling: per expert, a random share ``drop_ratio`` of the hidden units (rows of fc1 / the gate
  projection and their biases, columns of fc2) is re-initialised from a normal with the mean and std of the
  original tensor; each expert drops different units (seeded).
- ``split`` — MoEfication: the hidden units are partitioned into E groups of H/E (``cluster``: balanced k-means
  over the rows of fc1, ``random``: a random partition); expert e holds its slice, fc2's bias is shared out as
  b2/E, and the layer adds the chosen experts' outputs with weight 1 (``combine: sum``), so with k = E it is
  exactly the dense FFN and with k < E it runs k/E of its FLOPs.

Routers (``router_init``): ``random`` (N(0, 0.02)), ``kmeans`` (rows = the normalised k-means centres of the
layer's input tokens on calibration data: balanced, input-dependent routing from the first step) or
``activation`` (split experts: a router fitted to predict which slice is most active for each token).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.checks import Label, argument
from moe_cli.errors import ConfigError
from moe_cli.moe.config import ROUTER_STD, Init, MoEConfig, for_init
from moe_cli.moe.ffn import DenseFFN, read_ffn
from moe_cli.moe.layer import MoEMlp, layer_config


def from_dense(mlp: nn.Module, num_experts: int | None = None, k: int | None = None, noise_std: float = 0.0,
               generator: torch.Generator | None = None, config: MoEConfig | None = None, init: str = "copy",
               drop_ratio: float = 0.5, split: str = "cluster", hidden: int | None = None, shapes_only: bool = False,
               **moe) -> MoEMlp:
    """Upcycle a dense FFN (any layout of :mod:`moe_cli.moe.ffn`) into an :class:`MoEMlp`: experts made by ``init``
    (copy: copies of it, plus optional N(0, noise_std) noise; drop; split — see above), the router from
    ``generator`` (random, std 0.02). ``shapes_only``: build the layer for loading saved weights (``hidden``: the
    experts' hidden size when it is not the one ``init`` gives, e.g. a pruned split layer), without computing
    expert weights."""
    dense = read_ffn(mlp)
    cfg = for_init(layer_config(config, num_experts, k, moe), init)
    slices = cfg.experts + cfg.shared_experts  # split: the shared experts hold slices of their own
    if hidden is None:
        hidden = dense.hidden_features // slices if init == Init.split else dense.hidden_features
    eps, act = dense.norm_eps, dense.act
    layer = MoEMlp(dense.in_features, hidden, dense.out_features, act_layer=lambda: copy.deepcopy(act),
                   glu=dense.glu, bias=dense.bias, drop=dense.drop,
                   norm_layer=None if eps is None else (lambda h: nn.LayerNorm(h, eps=eps)),
                   use_conv=dense.channels_first, config=cfg)
    if shapes_only:
        return layer.to(device=dense.device)
    routed, shared = upcycled_weights(dense, cfg, init, noise_std, drop_ratio, split, generator)
    with torch.no_grad():
        if generator is not None:
            weight = layer.router.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * ROUTER_STD)
        for bank, weights in ((layer.experts, routed), (layer.shared, shared)):
            for name, tensor in (weights.items() if bank is not None else ()):
                param = getattr(bank, name)
                param.copy_(tensor.to(param.dtype))
        if layer.shared_gate is not None:
            layer.shared_gate.weight.zero_()  # sigmoid(0) = 1/2 for every token at the start
    return layer.to(device=dense.device)


def upcycled_weights(spec: DenseFFN, cfg: MoEConfig, init: str, noise_std: float = 0.0, drop_ratio: float = 0.5,
                     split: str = "cluster", generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """(routed, shared) stacked expert tensors so that the layer starts as the dense FFN.

    With ``shared_experts`` S, the output y = routed + g * sum(shared) (g = sigmoid(gate . x), 1/2 at the start,
    or 1 ungated) reproduces the dense FFN f: copy and drop inits give every expert f's weights with the output
    projection (w2, b2) scaled — routed by 1 / (1 + S), shared by 1 / ((1 + S) g) — so routed (weights adding up
    to 1) + g * S shared = f; split gives the shared experts their own slices of f's hidden units (E + S slices,
    b2 shared out), scaled by 1 / g, exact when every routed slice is chosen (k = E)."""
    E, S = cfg.experts, cfg.shared_experts
    if init == Init.split:
        slices = expert_weights(spec, E + S, init, noise_std, drop_ratio, split, generator, cfg.words())
        routed, shared = {n: t[:E] for n, t in slices.items()}, {n: t[E:].clone() for n, t in slices.items()}
    else:
        routed = expert_weights(spec, E, init, noise_std, drop_ratio, split, generator, cfg.words())
        shared = expert_weights(spec, S, Init.copy) if S else {}
    if S:
        g = 0.5 if cfg.shared_gate else 1.0
        c_routed, c_shared = (1.0, 1 / g) if init == Init.split else (1 / (1 + S), 1 / ((1 + S) * g))
        for name in ("w2", "b2"):
            if name in routed:
                routed[name], shared[name] = routed[name] * c_routed, shared[name] * c_shared
    return routed, shared


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of ``sim`` (N, E) to a column, at most ``capacity`` rows per column, greedily by similarity
    (capacity 1 with N = E: a permutation, the hidden-unit alignment of merging)."""
    n, e = sim.shape
    order = sim.flatten().argsort(descending=True).tolist()
    assign = [-1] * n
    fill = [0] * e
    left = n
    for idx in order:
        row, col = divmod(idx, e)
        if assign[row] < 0 and fill[col] < capacity:
            assign[row], fill[col], left = col, fill[col] + 1, left - 1
            if left == 0:
                break
    return torch.tensor(assign)


def balanced_kmeans(x: torch.Tensor, groups: int, generator: torch.Generator, iters: int = 10) -> torch.Tensor:
    """(N,) group of each row of ``x`` (N, D), every group of N / groups rows, by k-means on cosine similarity."""
    n = x.shape[0]
    xn = F.normalize(x.float(), dim=-1)
    centers = xn[torch.randperm(n, generator=generator)[:groups]]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = balanced_assign(xn @ centers.T, n // groups)
        centers = F.normalize(torch.stack([xn[assign == g].mean(0) for g in range(groups)]), dim=-1)
    return assign


def hidden_partition(spec: DenseFFN, experts: int, method: str, generator: torch.Generator,
                     label: Label = argument) -> list[torch.Tensor]:
    """The hidden-unit indices of each expert for ``split``."""
    h = spec.hidden_features
    if h % experts:
        raise ConfigError(f"{label('init')} split needs the hidden size ({h}) to be a multiple of {label('experts')} "
                          f"({experts}, shared experts included)")
    if method == "random":
        perm = torch.randperm(h, generator=generator)
        return [perm[e * (h // experts):(e + 1) * (h // experts)].sort().values for e in range(experts)]
    w = spec.weights
    rows = torch.cat([w["w1"], w["wg"]], dim=1) if "wg" in w else w["w1"]
    assign = balanced_kmeans(rows.cpu(), experts, generator)
    return [torch.nonzero(assign == e).flatten() for e in range(experts)]


def expert_weights(spec: DenseFFN, experts: int, init: str = "copy", noise_std: float = 0.0, drop_ratio: float = 0.5,
                   split: str = "cluster", generator: torch.Generator | None = None,
                   label: Label = argument) -> dict[str, torch.Tensor]:
    """Stacked (E, ...) expert tensors for the dense FFN ``spec`` (:func:`moe_cli.moe.ffn.read_ffn`); ``drop_ratio``
    is a checked config value (UpcycleCfg), ``label`` names the fields in the caller's words."""
    gen = generator or torch.Generator().manual_seed(0)
    w = {k: v.detach().cpu() for k, v in spec.weights.items()}
    if init == "split":
        if "norm_w" in w:
            raise ConfigError(f"{label('init')} split needs FFNs without a hidden LayerNorm (it normalises over all "
                              "hidden units, which split experts do not see together)")
        parts = hidden_partition(spec, experts, split, gen, label)
        out = {}
        for name in ("w1", "wg", "b1", "bg"):
            if name in w:
                out[name] = torch.stack([w[name][idx] for idx in parts])
        out["w2"] = torch.stack([w["w2"][:, idx] for idx in parts])
        if "b2" in w:
            out["b2"] = (w["b2"] / experts).expand(experts, -1).clone()
        return out
    out = {name: t.unsqueeze(0).expand(experts, *t.shape).clone() for name, t in w.items()}
    if init == "drop":
        h = spec.hidden_features
        n_drop = round(drop_ratio * h)
        stats = {name: (w[name].float().mean(), w[name].float().std()) for name in ("w1", "wg", "w2", "b1", "bg")
                 if name in w and w[name].numel() > 1}
        for e in range(experts):
            units = torch.randperm(h, generator=gen)[:n_drop]
            for name, (mean, std) in stats.items():
                t = out[name][e]
                view = t[:, units] if name == "w2" else t[units]
                fresh = torch.randn(view.shape, generator=gen) * std + mean
                if name == "w2":
                    t[:, units] = fresh.to(t.dtype)
                else:
                    t[units] = fresh.to(t.dtype)
    if noise_std > 0:
        for name in ("w1", "wg", "w2"):
            if name in out:
                out[name] += torch.randn(out[name].shape, generator=gen).to(out[name].dtype) * noise_std
    return out


@torch.no_grad()
def kmeans_router(tokens: torch.Tensor, experts: int, generator: torch.Generator, iters: int = 20,
                  label: Label = argument) -> torch.Tensor:
    """(E, D) router rows: the normalised k-means centres of ``tokens`` (N, D) (cosine k-means, spherical)."""
    if tokens.shape[0] < experts:
        raise ConfigError(f"the calibration data gives {tokens.shape[0]} tokens, fewer than the {experts} experts "
                          f"k-means needs; give more calibration images ({label('calib')}, "
                          f"{label('calib_batches')})")
    x = F.normalize(tokens.float(), dim=-1)
    centers = x[torch.randperm(x.shape[0], generator=generator)[:experts]].clone()
    for _ in range(iters):
        assign = (x @ centers.T).argmax(-1)
        for e in range(experts):
            members = x[assign == e]
            if len(members):
                centers[e] = F.normalize(members.mean(0), dim=-1)
    return centers


def activation_router(tokens: torch.Tensor, layer, steps: int = 200, lr: float = 0.05) -> torch.Tensor:
    """(E, D) router rows fitted (softmax regression) to predict each token's most active expert slice (the
    largest norm of act(x W1_e + b1_e)), as MoEfication's router."""
    ex = layer.experts
    x = tokens.float()
    with torch.no_grad():
        h = torch.einsum("td,ehd->teh", x, ex.w1.float())
        if ex.b1 is not None:
            h = h + ex.b1.float()
        if ex.glu:
            g = torch.einsum("td,ehd->teh", x, ex.wg.float()) + (ex.bg.float() if ex.bg is not None else 0)
            h = ex.act(g) * h
        else:
            h = ex.act(h)
        target = h.norm(dim=-1).argmax(-1)
    w = torch.zeros(ex.num_experts, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()
