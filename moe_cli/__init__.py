"""moe-cli: turn dense transformer checkpoints into Mixture-of-Experts models.

``moe_cli.load``, ``moe_cli.save`` and ``moe_cli.upcycle`` are imported on first use, so ``import moe_cli`` (and
``moe --version``) does not import torch."""

__version__ = "0.2.0"

_LAZY = {"load": "moe_cli.io.sources", "save": "moe_cli.io.checkpoint", "upcycle": "moe_cli.models.surgery",
         "MoeError": "moe_cli.errors"}

__all__ = ["MoeError", "__version__", "load", "save", "upcycle"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_cli' has no attribute {name!r}")
