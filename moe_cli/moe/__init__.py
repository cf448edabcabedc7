"""The MoE layer, usable without the CLI: its config, Router / Dispatcher / Experts, the routing recorder (aux losses
and statistics), dense FFN layouts (:mod:`.ffn`) and the upcycling constructors (:mod:`.upcycling`)."""

from moe_cli.moe.config import MoEConfig, MoELayout, UpcycleCfg
from moe_cli.moe.dispatch import Dispatcher
from moe_cli.moe.dispatchers import DISPATCHERS, GroupedDispatcher, LoopDispatcher, TritonDispatcher
from moe_cli.moe.experts import Experts
from moe_cli.moe.layer import MoEMlp, moe_layers
from moe_cli.moe.recorder import LayerRecord, RoutingRecorder, routing_stats
from moe_cli.moe.router import ROUTERS, ExpertChoiceRouter, Router, SoftRouter, TopKRouter, TopPRouter
from moe_cli.moe.upcycling import from_dense

__all__ = ["DISPATCHERS", "ROUTERS", "Dispatcher", "ExpertChoiceRouter", "Experts", "GroupedDispatcher",
           "LayerRecord", "LoopDispatcher", "MoEConfig", "MoELayout", "MoEMlp", "Router", "RoutingRecorder",
           "SoftRouter", "TopKRouter", "TopPRouter", "TritonDispatcher", "UpcycleCfg", "from_dense", "moe_layers",
           "routing_stats"]
