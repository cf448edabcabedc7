"""Model surgery: find the FFNs of a dense model, replace them by upcycled MoE layers, read the layout back."""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

from moe_cli.checks import Label, argument, labelled
from moe_cli.errors import ConfigError
from moe_cli.moe.config import MoELayout, UpcycleCfg, select_layers
from moe_cli.moe.ffn import known_layouts, layout_of, read_ffn
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.upcycling import from_dense
from moe_cli.runtime import memory_bytes


def find_ffns(model: nn.Module, target: str | None = None, label: Label = argument) -> list[tuple[str, nn.Module]]:
    """FFN modules in definition order: those of a known layout (:mod:`moe_cli.moe.ffn`: timm Mlp / GluMlp /
    SwiGLU, the gate/up/down MLP) under the model's ``moe_scope`` prefix (e.g. only an MAE's encoder), or the
    modules whose names match ``target``."""
    if target is None:
        scope = getattr(model, "moe_scope", "")
        return [(n, m) for n, m in model.named_modules() if n.startswith(scope) and layout_of(m, named=False)]
    found = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, target)]
    if not found:
        raise ConfigError(f"{label('target')} {target!r} matches no module name (e.g. 'blocks.*.mlp')")
    for name, module in found:
        if layout_of(module) is None:
            raise ConfigError(f"{label('target')} matched `{name}` ({type(module).__name__}), which is not an FFN of "
                              f"a known layout ({known_layouts()})")
    return found


def upcycle_targets(model: nn.Module, cfg: UpcycleCfg) -> tuple[str, ...]:
    """The module names of the FFNs that ``cfg`` converts."""
    ffns = find_ffns(model, cfg.target, cfg.words())
    if not ffns:
        raise ConfigError(f"no FFN module of a known layout ({known_layouts()}) found in {type(model).__name__}; "
                          f"name the FFNs with {cfg.label('target')} GLOB")
    return tuple(ffns[i][0] for i in select_layers(len(ffns), cfg.layers, cfg.words()))


def upcycle(model: nn.Module, cfg: UpcycleCfg | None = None, *, seed: int = 0, **fields) -> tuple[nn.Module, MoELayout]:
    """Replace the chosen FFNs of ``model`` (in place) by MoE layers whose experts start from the dense FFN.

    ``cfg`` (or ``fields``: experts, k, layers, target, gate, capacity_factor, init, ... — see UpcycleCfg) says
    which FFNs and how; the routers are drawn from ``seed``. Returns the model and the layout to store with it."""
    cfg = cfg or UpcycleCfg(**fields)
    names = upcycle_targets(model, cfg)
    check_memory(model, names, (cfg.experts + cfg.shared_experts) if cfg.init != "split" else 1, cfg.label("experts"))
    with labelled(cfg.words()):
        layout = MoELayout(**cfg.layer_config().values(), layers=names, init=cfg.init)
    apply_moe(model, layout, seed=seed, noise_std=cfg.noise_std, drop_ratio=cfg.drop_ratio, split=cfg.split)
    return model, layout_of_model(model, cfg.init)


def check_memory(model: nn.Module, names: tuple[str, ...], experts: int, where: str = "experts") -> None:
    """Refuse in one line an MoE whose experts would not fit in memory (before allocating anything)."""
    need = 0
    for name in names:
        ffn = model.get_submodule(name)
        need += experts * sum(p.numel() * p.element_size() for p in ffn.parameters())
    param = next(model.parameters(), None)
    have = memory_bytes(param.device if param is not None else None)
    if have is not None and need > 0.8 * have:
        raise ConfigError(f"{where} {experts} needs about {need / 1e9:.1f} GB for the expert weights of "
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
            read_ffn(dense)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"cannot upcycle `{name}` ({type(dense).__name__}): {e}") from None
        hidden = layout.layer_hidden[i] if layout.layer_hidden else None
        model.set_submodule(name, from_dense(dense, config=layout.layer(i), noise_std=noise_std, generator=gen,
                                             init=layout.init, drop_ratio=drop_ratio, split=split, hidden=hidden,
                                             shapes_only=shapes_only))
    return model


def layout_of_model(model: nn.Module, init: str = "copy") -> MoELayout | None:
    """The checkpoint layout of ``model``'s MoE layers, read from the layers (which own their config): the first
    layer's routing settings, every layer's name, expert count and hidden size. Switched-off experts are an
    inference override and are not part of it."""
    layers = moe_layers(model)
    if not layers:
        return None
    cfg = layers[0][1].cfg.routing()
    counts = tuple(m.num_experts for _, m in layers)
    return MoELayout(**{**cfg.values(), "experts": max(counts), "disabled": ()}, layers=tuple(n for n, _ in layers),
                     init=init, layer_experts=counts, layer_hidden=tuple(m.experts.dims[0] for _, m in layers))


def upcycled_copy(model: nn.Module, **kwargs) -> tuple[nn.Module, MoELayout]:
    """Upcycle a deep copy, leaving ``model`` dense."""
    return upcycle(copy.deepcopy(model), **kwargs)
