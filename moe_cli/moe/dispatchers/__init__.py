"""The dispatcher registry: ``impl`` names a dispatcher here; ``auto`` takes the first, in this order, whose
``preferred(x, experts)`` holds. A new dispatcher is one module (a Dispatcher and its Plan type) and one line
here."""

from moe_cli.moe.dispatch import Dispatcher
from moe_cli.moe.dispatchers.grouped import GroupedDispatcher
from moe_cli.moe.dispatchers.loop import LoopDispatcher
from moe_cli.moe.dispatchers.triton import TritonDispatcher

DISPATCHERS: dict[str, Dispatcher] = {d.name: d for d in (
    TritonDispatcher(),
    GroupedDispatcher(),
    LoopDispatcher(),  # runs anywhere: auto's last resort
)}
DISPATCHER_NAMES = tuple(DISPATCHERS)

__all__ = ["DISPATCHERS", "DISPATCHER_NAMES", "GroupedDispatcher", "LoopDispatcher", "TritonDispatcher"]
