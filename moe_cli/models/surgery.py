"""Model surgery: find the FFNs of a dense model and replace them by upcycled MoE layers."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
from dataclasses import dataclass

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from moe_cli.errors import ConfigError, MoeError
from moe_cli.moe.config import MoELayout, UpcycleCfg
from moe_cli.moe.init import activation_router, kmeans_router
from moe_cli.moe.layer import MoEMlp, dense_spec, moe_layers
from moe_cli.runtime import memory_bytes

FFN_TYPES = (Mlp, GluMlp, SwiGLU)
TOLERANCE = 1e-4  # upcycling check: max |dense - moe| relative to max(1, max |dense|)


def _is_ffn_like(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("fc2", "act")) and (hasattr(module, "fc1") or hasattr(module, "fc1_g"))


def find_ffns(model: nn.Module, target: str | None = None) -> list[tuple[str, nn.Module]]:
    """FFN modules in definition order: timm Mlp/GluMlp/SwiGLU (under the model's ``moe_scope`` prefix, e.g. only
    an MAE's encoder), or the modules whose names match ``target``."""
    if target is None:
        scope = getattr(model, "moe_scope", "")
        return [(n, m) for n, m in model.named_modules() if type(m) in FFN_TYPES and n.startswith(scope)]
    found = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, target)]
    if not found:
        raise ConfigError(f"--target {target!r} matches no module name (e.g. 'blocks.*.mlp')")
    for name, module in found:
        if not _is_ffn_like(module):
            raise ConfigError(f"--target matched `{name}` ({type(module).__name__}), which is not an FFN "
                              "with fc1, act and fc2")
    return found


def select_layers(count: int, spec: str) -> list[int]:
    """Indices into the FFN list: 'all', 'every-N' (each N-th, ending on the last), 'last-N', or '0,3,5'."""
    spec = spec.strip()
    if spec == "all":
        return list(range(count))
    if m := re.fullmatch(r"every-(\d+)", spec):
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"--layers every-N needs N >= 1, got {spec!r}")
        return [i for i in range(count) if (count - 1 - i) % n == 0]
    if m := re.fullmatch(r"last-(\d+)", spec):
        n = int(m.group(1))
        if not 1 <= n <= count:
            raise ConfigError(f"--layers last-N needs 1 <= N <= {count} (FFN layers found), got {spec!r}")
        return list(range(count - n, count))
    try:
        idx = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--layers must be all, every-N, last-N or a list like 0,3,5; got {spec!r}") from None
    bad = [i for i in idx if not 0 <= i < count]
    if bad:
        raise ConfigError(f"--layers index {bad[0]} out of range: the model has {count} FFN layers (0..{count - 1})")
    return idx


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def upcycle_targets(model: nn.Module, cfg: UpcycleCfg) -> tuple[str, ...]:
    """The module names of the FFNs that ``cfg`` converts."""
    ffns = find_ffns(model, cfg.target)
    if not ffns:
        raise ConfigError(f"no FFN module (timm {', '.join(t.__name__ for t in FFN_TYPES)}) found in "
                          f"{type(model).__name__}; name the FFNs with --target GLOB")
    return tuple(ffns[i][0] for i in select_layers(len(ffns), cfg.layers))


def upcycle(model: nn.Module, cfg: UpcycleCfg | None = None, *, seed: int = 0, **fields) -> tuple[nn.Module, MoELayout]:
    """Replace the chosen FFNs of ``model`` (in place) by MoE layers whose experts start from the dense FFN.

    ``cfg`` (or ``fields``: experts, k, layers, target, gate, capacity_factor, init, ... — see UpcycleCfg) says
    which FFNs and how; the routers are drawn from ``seed``. Returns the model and the layout to store with it."""
    cfg = (cfg or UpcycleCfg(**fields)).validate()
    names = upcycle_targets(model, cfg)
    check_memory(model, names, cfg.experts if cfg.init != "split" else 1)
    routing = cfg.routing()
    if cfg.init == "split":
        routing = dataclasses.replace(routing, combine="sum")
    layout = MoELayout(**routing.__dict__, layers=names, init=cfg.init)
    apply_moe(model, layout, seed=seed, noise_std=cfg.noise_std, drop_ratio=cfg.drop_ratio, split=cfg.split)
    return model, layout


def check_memory(model: nn.Module, names: tuple[str, ...], experts: int) -> None:
    """Refuse in one line an MoE whose experts would not fit in memory (before allocating anything)."""
    need = 0
    for name in names:
        ffn = model.get_submodule(name)
        need += experts * sum(p.numel() * p.element_size() for p in ffn.parameters())
    param = next(model.parameters(), None)
    have = memory_bytes(param.device if param is not None else None)
    if have is not None and need > 0.8 * have:
        raise ConfigError(f"--experts {experts} needs about {need / 1e9:.1f} GB for the expert weights of "
                          f"{len(names)} layers, more than this machine has ({have / 1e9:.1f} GB); use fewer experts "
                          "or layers")


def apply_moe(model: nn.Module, layout: MoELayout, seed: int = 0, noise_std: float = 0.0, drop_ratio: float = 0.5,
              split: str = "cluster", shapes_only: bool = False) -> nn.Module:
    """Swap each module named in ``layout.layers`` for an MoEMlp built from it (routers from ``seed``);
    ``shapes_only`` when the weights will be loaded from a checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    cfg = layout.routing()
    for name in layout.layers:
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"MoE layer `{name}` does not exist in {type(model).__name__}") from None
        try:
            dense_spec(dense)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"cannot upcycle `{name}` ({type(dense).__name__}): {e}") from None
        _set_module(model, name, MoEMlp.from_dense(dense, config=cfg, noise_std=noise_std, generator=gen,
                                                   init=layout.init, drop_ratio=drop_ratio, split=split,
                                                   shapes_only=shapes_only))
    return model


@torch.no_grad()
def capture_inputs(model: nn.Module, names: tuple[str, ...], batches, max_tokens: int = 8192) -> dict:
    """The input tokens (N, D) of each named module over ``batches`` (forward pre-hooks), up to ``max_tokens``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name):
        def fn(_module, args):
            x = args[0]
            x = x.movedim(1, -1) if x.dim() == 4 and isinstance(getattr(_module, "fc2", None), nn.Conv2d) else x
            seen[name].append(x.reshape(-1, x.shape[-1]).detach().float().cpu())
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.to(device))
            if sum(t.shape[0] for t in seen[names[0]]) >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v)[:max_tokens] for n, v in seen.items()}


@torch.no_grad()
def init_routers(model: nn.Module, tokens: dict, method: str, seed: int = 0) -> dict[str, list[float]]:
    """Set each MoE layer's router from its input ``tokens`` (kmeans centres, or fitted to the most active split
    slice) and return the initial expert load per layer on those tokens."""
    gen = torch.Generator().manual_seed(seed)
    load = {}
    for name, layer in moe_layers(model):
        x = tokens[name]
        if method == "kmeans":
            rows = kmeans_router(x, layer.num_experts, gen)
        else:
            with torch.enable_grad():
                rows = activation_router(x, layer)
        layer.router.weight.copy_(rows.to(layer.router.weight))
        routing = layer.router.eval()(x.to(layer.router.weight.device))
        counts = torch.bincount(routing.expert[routing.expert >= 0].flatten(), minlength=layer.num_experts).float()
        load[name] = (counts / counts.sum().clamp_min(1)).tolist()
    return load


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters active per token): each MoE layer counts only its k used experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.num_experts - m.active_experts) * m.experts.params_per_expert() for _, m in moe_layers(model))
    return total, round(total - inactive)


@torch.no_grad()
def max_output_diff(dense: nn.Module, sparse: nn.Module, probe: torch.Tensor) -> tuple[float, float]:
    """(max |dense(x) - sparse(x)|, max |dense(x)|) on a probe batch, both models in eval mode.

    Capacity limits are lifted for the check: dropping overflow tokens is routing, not a copy error."""
    layers = moe_layers(sparse)
    saved = [m.cfg for _, m in layers]
    for _, m in layers:
        m.reconfigure(capacity_factor=None, eval_capacity_factor=None)
    try:
        dense_out, sparse_out = dense.eval()(probe), sparse.eval()(probe)
    finally:
        for (_, m), cfg in zip(layers, saved, strict=True):
            m.reconfigure(cfg)
    return (sparse_out - dense_out).abs().max().item(), dense_out.abs().max().item()


def upcycled_copy(model: nn.Module, **kwargs) -> tuple[nn.Module, MoELayout]:
    """Upcycle a deep copy, leaving ``model`` dense."""
    return upcycle(copy.deepcopy(model), **kwargs)




class UpcycleMismatch(MoeError):
    """The upcycled model does not compute what the dense one did (exit code 1: a failed check, not bad input)."""

    exit_code = 1


@dataclass(frozen=True)
class Verification:
    """The upcycling check: max |dense(x) - moe(x)| on a probe batch against ``tolerance * max(1, max |dense|)``."""

    max_diff: float | None
    scale: float | None
    limit: float | None
    ok: bool
    skipped: str = ""  # why no comparison was made

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def verify_upcycle(dense: nn.Module, sparse: nn.Module, probe: torch.Tensor, layout: MoELayout,
                   tolerance: float = TOLERANCE) -> Verification:
    """Prove the MoE computes what the dense model did (capacity limits lifted). Expert choice gives each token
    a varying number of experts, so it cannot reproduce the dense output: the check is skipped."""
    if layout.gate == "expert_choice":
        return Verification(None, None, None, True, "expert choice gives each token a varying number of experts, so "
                            "the MoE does not reproduce the dense output by design")
    diff, scale = max_output_diff(dense, sparse, probe)
    limit = tolerance * max(1.0, scale)
    return Verification(diff, scale, limit, diff <= limit)
