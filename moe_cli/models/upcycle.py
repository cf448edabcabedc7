"""Upcycling a dense model as users ask for it: convert the chosen FFNs, fit the routers to calibration data if
asked, and prove that the MoE computes what the dense model did."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe_cli.errors import ConfigError, MoeError
from moe_cli.models.calibrate import capture_inputs, init_routers
from moe_cli.models.probe import probe_batch
from moe_cli.models.surgery import upcycle, upcycle_targets
from moe_cli.moe.config import Gate, Init, MoELayout, UpcycleCfg
from moe_cli.moe.layer import moe_layers

TOLERANCE = 1e-4  # upcycling check: max |dense - moe| relative to max(1, max |dense|)


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


@dataclass
class Upcycled:
    """What :func:`upcycle_verified` made: the MoE model, its layout, the check, the initial expert load on the
    calibration data (data-driven routers) and the dense model's parameter count."""

    model: nn.Module
    layout: MoELayout
    verification: Verification | None
    initial_load: dict | None
    dense_params: int


def must_match(cfg: UpcycleCfg) -> bool:
    """Whether the upcycled model must reproduce the dense one exactly: copies without noise, or split slices
    all routed (k = E)."""
    return cfg.noise_std == 0 and (cfg.init == Init.copy or (cfg.init == Init.split and cfg.k == cfg.experts
                                                            and cfg.gate == Gate.topk))


def upcycle_verified(model: nn.Module, cfg: UpcycleCfg, *, seed: int = 0, verify: bool = False,
                     tolerance: float = TOLERANCE, calibration=None) -> Upcycled:
    """Turn the dense ``model`` into an MoE (in place). ``calibration``: batches of model inputs for a data-driven
    ``router_init`` (the routers are fitted to the inputs each converted FFN sees in the dense model). With
    ``verify``, prove on a probe batch that the MoE computes what the dense model did; where it must
    (:func:`must_match`), a mismatch raises :class:`UpcycleMismatch` (the caller's dense model is then lost:
    pass a copy if it is still needed)."""
    if moe_layers(model):
        raise ConfigError("the model is already an MoE")
    if verify and (why := cfg.cannot_reproduce()):
        raise ConfigError(f"cannot verify this upcycling: {why}")
    tokens = None
    if cfg.router_init != "random":
        if calibration is None:
            raise ConfigError(f"{cfg.label('router_init')} {cfg.router_init} needs calibration batches (calibration=)")
        tokens = capture_inputs(model, upcycle_targets(model, cfg), calibration)
    dense_params = sum(p.numel() for p in model.parameters())
    dense = copy.deepcopy(model).eval() if verify else None
    probe = probe_batch(model, seed=seed) if verify else None
    try:
        sparse, layout = upcycle(model, cfg, seed=seed)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise ConfigError(f"out of memory while building {cfg.experts} experts per layer ({type(e).__name__}); use "
                          f"fewer {cfg.label('experts')} or {cfg.label('layers')}") from None
    except RuntimeError as e:
        if "alloc" not in str(e):
            raise
        raise ConfigError(f"out of memory while building {cfg.experts} experts per layer; use fewer "
                          f"{cfg.label('experts')} or {cfg.label('layers')}") from None
    initial_load = init_routers(sparse, tokens, cfg.router_init, seed, cfg.words()) if tokens is not None else None
    result = verify_upcycle(dense, sparse, probe, layout, tolerance) if verify else None
    if result is not None and not result.ok and must_match(cfg):
        raise UpcycleMismatch(f"the upcycled model does not reproduce the dense model: max |dense - moe| = "
                              f"{result.max_diff:.3e} > {result.limit:.1e}; nothing was written")
    return Upcycled(sparse, layout, result, initial_load, dense_params)
