"""What moe-cli does to models: surgery (find and convert FFNs), upcycling with its proof, router calibration,
prune / merge / densify, inference overrides, FLOPs; the networks it evaluates with (LPIPS, token decoders); and
its own timm-registered models (`mae_vit`, `maskgit_video`, `genie`). Sources and checkpoints are `moe_cli.io`."""

from moe_cli.models import genie, mae, video  # noqa: F401  (registers the timm entrypoints)
