"""Model surgery: find the FFNs of a dense model and replace them by upcycled MoE layers."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
from dataclasses import asdict, dataclass, field

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.moe.dispatch import IMPLS
from moe_cli.moe.layer import MoEMlp, dense_spec
from moe_cli.moe.routing import GATES, PRIORITIES

FFN_TYPES = (Mlp, GluMlp, SwiGLU)


@dataclass(frozen=True)
class MoEConfig:
    """How a model was made sparse; stored in checkpoint metadata and enough to rebuild the layers."""

    experts: int = 4
    k: int = 2
    gate: str = "topk"
    normalize: bool = True
    noise_std: float = 0.0
    layers: tuple[str, ...] = field(default_factory=tuple)  # module names of the MoE layers
    capacity_factor: float | None = None  # None: no token dropping (token choice); expert choice default 1.0
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    priority: str = "slot"  # who keeps its place when an expert overflows: slot order or score (BPR)
    impl: str = "auto"  # expert dispatch: auto | loop | grouped

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "layers": tuple(known.get("layers", ()))})

    def validate(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"--experts must be at least 1, got {self.experts}")
        if self.gate not in GATES:
            raise ConfigError(f"--gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.gate == "topk" and not 1 <= self.k <= self.experts:
            raise ConfigError(f"--k must be between 1 and --experts ({self.experts}), got {self.k}")
        if self.noise_std < 0:
            raise ConfigError(f"--noise-std must be >= 0, got {self.noise_std}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"--priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"--impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")


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


def upcycle(model: nn.Module, experts: int = 4, k: int = 2, layers: str = "all", target: str | None = None,
            gate: str = "topk", normalize: bool = True, noise_std: float = 0.0, seed: int = 0,
            **routing) -> tuple[nn.Module, MoEConfig]:
    """Replace the chosen FFNs of ``model`` (in place) by MoE layers whose experts copy the dense FFN.

    ``routing``: capacity_factor, eval_capacity_factor, priority, impl (see MoEConfig)."""
    cfg = MoEConfig(experts, k, gate, normalize, noise_std, **routing)
    cfg.validate()
    ffns = find_ffns(model, target)
    if not ffns:
        raise ConfigError(f"no FFN module (timm {', '.join(t.__name__ for t in FFN_TYPES)}) found in "
                          f"{type(model).__name__}; name the FFNs with --target GLOB")
    cfg = dataclasses.replace(cfg, layers=tuple(ffns[i][0] for i in select_layers(len(ffns), layers)))
    apply_moe(model, cfg, seed=seed)
    return model, cfg


def apply_moe(model: nn.Module, cfg: MoEConfig, seed: int = 0) -> nn.Module:
    """Swap each module named in ``cfg.layers`` for an MoEMlp built from it (routers from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    for name in cfg.layers:
        dense = model.get_submodule(name)
        try:
            dense_spec(dense)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"cannot upcycle `{name}` ({type(dense).__name__}): {e}") from None
        moe = MoEMlp.from_dense(dense, cfg.experts, cfg.k, noise_std=cfg.noise_std, generator=gen,
                                gate=cfg.gate, normalize=cfg.normalize, capacity_factor=cfg.capacity_factor,
                                eval_capacity_factor=cfg.eval_capacity_factor, priority=cfg.priority,
                                impl=cfg.impl)
        _set_module(model, name, moe)
    return model


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]


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
    saved = [(m.capacity_factor, m.eval_capacity_factor) for _, m in layers]
    for _, m in layers:
        m.capacity_factor = m.eval_capacity_factor = None
    try:
        dense_out, sparse_out = dense.eval()(probe), sparse.eval()(probe)
    finally:
        for (_, m), (cf, ecf) in zip(layers, saved, strict=True):
            m.capacity_factor, m.eval_capacity_factor = cf, ecf
    return (sparse_out - dense_out).abs().max().item(), dense_out.abs().max().item()


def upcycled_copy(model: nn.Module, **kwargs) -> tuple[nn.Module, MoEConfig]:
    """Upcycle a deep copy, leaving ``model`` dense."""
    return upcycle(copy.deepcopy(model), **kwargs)
