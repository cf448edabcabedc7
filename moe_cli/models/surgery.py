"""Model surgery: find the FFNs of a dense model, replace them by upcycled MoE layers, read the layout back."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.moe.config import MoELayout, UpcycleCfg
from moe_cli.moe.init import dense_spec, from_dense
from moe_cli.moe.layer import moe_layers
from moe_cli.runtime import memory_bytes

FFN_TYPES = (Mlp, GluMlp, SwiGLU)


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
    check_memory(model, names, (cfg.experts + cfg.shared_experts) if cfg.init != "split" else 1)
    layout = MoELayout(**cfg.layer_config().__dict__, layers=names, init=cfg.init)
    apply_moe(model, layout, seed=seed, noise_std=cfg.noise_std, drop_ratio=cfg.drop_ratio, split=cfg.split)
    return model, layout_of(model, cfg.init)


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
                          f"{len(names)} layers, more than this process may use ({have / 1e9:.1f} GB); use fewer "
                          "experts or layers")


def apply_moe(model: nn.Module, layout: MoELayout, seed: int = 0, noise_std: float = 0.0, drop_ratio: float = 0.5,
              split: str = "cluster", shapes_only: bool = False) -> nn.Module:
    """Swap each module named in ``layout.layers`` for an MoEMlp built from it (routers from ``seed``);
    ``shapes_only`` when the weights will be loaded from a checkpoint (each layer with its recorded shape)."""
    gen = torch.Generator().manual_seed(seed)
    for i, name in enumerate(layout.layers):
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"MoE layer `{name}` does not exist in {type(model).__name__}") from None
        try:
            dense_spec(dense)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"cannot upcycle `{name}` ({type(dense).__name__}): {e}") from None
        hidden = layout.layer_hidden[i] if layout.layer_hidden else None
        model.set_submodule(name, from_dense(dense, config=layout.layer(i), noise_std=noise_std, generator=gen,
                                             init=layout.init, drop_ratio=drop_ratio, split=split, hidden=hidden,
                                             shapes_only=shapes_only))
    return model


def layout_of(model: nn.Module, init: str = "copy") -> MoELayout | None:
    """The checkpoint layout of ``model``'s MoE layers, read from the layers (which own their config): the first
    layer's routing settings, every layer's name, expert count and hidden size. Switched-off experts are an
    inference override and are not part of it."""
    layers = moe_layers(model)
    if not layers:
        return None
    cfg = dataclasses.replace(layers[0][1].cfg.routing(), disabled=())
    counts = tuple(m.num_experts for _, m in layers)
    return MoELayout(**{**cfg.__dict__, "experts": max(counts)}, layers=tuple(n for n, _ in layers), init=init,
                     layer_experts=counts, layer_hidden=tuple(m.experts.dims[0] for _, m in layers))


def upcycled_copy(model: nn.Module, **kwargs) -> tuple[nn.Module, MoELayout]:
    """Upcycle a deep copy, leaving ``model`` dense."""
    return upcycle(copy.deepcopy(model), **kwargs)
