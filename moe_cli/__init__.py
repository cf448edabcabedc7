"""moe-cli: turn dense transformer checkpoints into Mixture-of-Experts models."""

__version__ = "0.2.0"

from moe_cli.errors import MoeError  # noqa: E402
from moe_cli.io.checkpoint import save  # noqa: E402
from moe_cli.io.sources import load  # noqa: E402
from moe_cli.models.surgery import upcycle  # noqa: E402

__all__ = ["MoeError", "__version__", "load", "save", "upcycle"]
