"""The MoE layer, usable without the CLI: config, Router / Dispatcher / Experts, routing statistics."""

from moe_cli.moe.config import MoEConfig, MoELayout, UpcycleCfg
from moe_cli.moe.dispatch import DISPATCHERS, Dispatcher, GroupedDispatcher, LoopDispatcher
from moe_cli.moe.layer import Experts, MoEMlp
from moe_cli.moe.router import ROUTERS, ExpertChoiceRouter, Router, SoftRouter, TopKRouter
from moe_cli.moe.stats import LayerRecord, RoutingRecorder, routing_stats

__all__ = ["DISPATCHERS", "ROUTERS", "Dispatcher", "ExpertChoiceRouter", "Experts", "GroupedDispatcher",
           "LayerRecord", "LoopDispatcher", "MoEConfig", "MoELayout", "MoEMlp", "Router", "RoutingRecorder",
           "SoftRouter", "TopKRouter", "UpcycleCfg", "routing_stats"]
