"""Model sources, surgery and moe-cli's own timm-registered models (`mae_vit`, `maskgit_video`)."""

from moe_cli.models import genie, mae, video  # noqa: F401  (registers the timm entrypoints)
