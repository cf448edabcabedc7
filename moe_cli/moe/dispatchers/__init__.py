"""The dispatcher registry: ``impl`` names a dispatcher here; ``auto`` takes the first, in this order, whose
``preferred(x, experts)`` holds. A new dispatcher is one module (a Dispatcher and its Plan type) and one line
here. The modules are imported when a layer first dispatches, so naming the choices (the MoE config does) costs
nothing."""

from __future__ import annotations

import functools
import importlib

REGISTRY = {  # name -> (module:class, help), in auto's order of preference
    "triton": ("triton:TritonDispatcher", "fused Triton kernels (CUDA)"),
    "grouped": ("grouped:GroupedDispatcher", "grouped GEMMs over all experts (CPU default)"),
    "loop": ("loop:LoopDispatcher", "F.linear per expert; runs anywhere, auto's last resort"),
}
DISPATCHER_NAMES = tuple(REGISTRY)
DISPATCHER_HELP = {name: help for name, (_, help) in REGISTRY.items()}


def _class(name: str):
    module, cls = REGISTRY[name][0].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


@functools.cache
def dispatchers() -> dict:
    """Name -> Dispatcher instance, in auto's order."""
    return {name: _class(name)() for name in REGISTRY}


def __getattr__(attr: str):
    if attr == "DISPATCHERS":
        return dispatchers()
    for name, target in REGISTRY.items():
        if target[0].endswith(":" + attr):
            return _class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["DISPATCHERS", "DISPATCHER_HELP", "DISPATCHER_NAMES", "GroupedDispatcher", "LoopDispatcher",
           "TritonDispatcher", "dispatchers"]
