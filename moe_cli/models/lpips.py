"""LPIPS (AlexNet) through the `lpips` package, on images in [-1, 1]; clear one-line errors when unavailable."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_cli.errors import MoeError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # what torchvision's AlexNet_Weights.IMAGENET1K_V1 caches
MIN_SIZE = 32  # AlexNet's pooling leaves nothing of smaller images


def alexnet_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def lpips_model(device: torch.device | str = "cpu") -> torch.nn.Module:
    """The LPIPS AlexNet metric (its linear weights ship with `lpips`; the backbone comes from the torch cache)."""
    try:
        import lpips
    except ImportError:
        raise MoeError("the lpips metric needs the `lpips` package: pip install -e '.[metrics]' in the moe-cli "
                       "checkout") from None
    try:
        quiet = io.StringIO()  # torchvision announces the backbone download on stdout/stderr: we say it in one line
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", verbose=False)
    except OSError as e:  # URLError is an OSError: no network and no cached backbone
        path = alexnet_cache_path()
        raise MoeError(f"LPIPS needs the AlexNet backbone weights, which could not be downloaded "
                       f"({getattr(e, 'reason', e)}); place {ALEXNET_FILE} (from "
                       f"https://download.pytorch.org/models/{ALEXNET_FILE}) in {path.parent}") from None
    return model.to(device).eval()


@torch.no_grad()
def lpips_distance(a: torch.Tensor, b: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Per-image LPIPS between two batches (N, 3, H, W) in [-1, 1]; 1-channel images are repeated to 3, and
    images under 32 px on a side are upsampled by a whole factor (nearest) to at least that."""
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    if min(a.shape[-2:]) < MIN_SIZE:
        factor = math.ceil(MIN_SIZE / min(a.shape[-2:]))
        a, b = (F.interpolate(t.float(), scale_factor=factor, mode="nearest") for t in (a, b))
    return model(a.float(), b.float()).flatten()
