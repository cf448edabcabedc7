"""Small runtime helpers every layer of the package may use: device choice, autocast, atomic file writes."""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from moe_cli.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', ...) checked, or cuda when available, else cpu."""
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {requested!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str):
    """Mixed precision for ``precision`` bf16/fp16 on ``device``; fp32 is a no-op context."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename onto ``target``, so no half-written file is ever visible."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
