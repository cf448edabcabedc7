"""Token -> image decoders for the LPIPS of token tasks: the user's ``module:function`` (imported only when the
user names it), its output checked, and a built-in palette decoder for synthetic data."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from moe_cli.errors import ConfigError


def palette_decoder(tokens: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """A token -> image decoder for synthetic data: each token paints a ``patch`` x ``patch`` block in a fixed
    colour of its own. (B, F, H, W) int -> (B, F, 3, H*patch, W*patch) in [-1, 1]."""
    t = tokens.long()
    primes = torch.tensor([37, 101, 173], device=t.device)
    rgb = ((t[..., None] * primes + 59) % 256).float() / 127.5 - 1  # (B, F, H, W, 3)
    img = rgb.permute(0, 1, 4, 2, 3)
    return img.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def load_decoder(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module:function`` or ``path/to/file.py:function`` -> the function (tokens -> images in [-1, 1])."""
    module_name, sep, func = spec.rpartition(":")
    if not sep or not module_name or not func:
        raise ConfigError(f"decoder must be given as module:function (e.g. mypkg.vq:decode), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"decoder file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # a SyntaxError, or anything the user's module raises while it is imported
        raise ConfigError(f"decoder {spec!r}: cannot import `{module_name}` ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"decoder {spec!r}: `{module_name}` has no function `{func}`")

    @functools.wraps(fn)
    def decoder(tokens: torch.Tensor) -> torch.Tensor:
        try:
            return fn(tokens)
        except Exception as e:  # the user's code: its failure is one line naming it, not our traceback
            raise ConfigError(f"decoder {spec!r} raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else '(no message)'}") from None

    return decoder


def decoded_frames(decoder, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Run the user decoder and check its output: (B, F, C, h, w) in [-1, 1] -> (B*F, C, h, w)."""
    images = decoder(tokens)
    b, f = tokens.shape[:2]
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or tuple(images.shape[:2]) != (b, f):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"the token decoder must return images (batch, frames, C, H, W) = ({b}, {f}, C, H, W), "
                          f"got {shape}")
    lo, hi = float(images.min()), float(images.max())
    if not (-1.0 - 1e-3 <= lo and hi <= 1.0 + 1e-3):  # LPIPS expects [-1, 1]: 0-255 images give silent nonsense
        raise ConfigError(f"the token decoder must return images in [-1, 1] (LPIPS' range), got values in "
                          f"[{lo:.3g}, {hi:.3g}]")
    return images.to(device).float().flatten(0, 1)
