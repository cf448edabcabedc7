"""The MoE layer, usable without the CLI."""

from moe_cli.moe.layer import Experts, MoEMlp

__all__ = ["Experts", "MoEMlp"]
