"""The 1X world-model token data (``data.name: genie``), as the released GENIE models were trained on.

A split folder (``train_v1.1``, ``val_v1.1``) holds ``metadata.json`` (``num_images``, ``s`` tokens per side,
``token_dtype`` default uint32, ``vocab_size``, ``hz``), ``video.bin`` (raw C-order tokens, (num_images, s, s),
memory-mapped) and ``segment_ids.bin`` (int32, one per image). A clip is ``window`` frames taken every
``stride`` images (16 and 15: 2 Hz from 30 Hz video): start s is kept only if images s and s + (window-1)*stride
share a segment (no clip across a recording boundary); for validation, clips whose frames would coincide
with an earlier kept clip's are dropped (greedy, increasing s), as the original's ``filter_overlaps``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moe_cli.data.tokens import check_token_ids
from moe_cli.errors import ConfigError

TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")


@dataclass(frozen=True)
class GenieMeta:
    root: Path
    num_images: int
    side: int
    dtype: str
    vocab_size: int
    hz: int | None


def read_meta(root: str | os.PathLike) -> GenieMeta:
    """Parse and check a 1X data folder; each problem is one ConfigError naming the file and field."""
    root = Path(root)
    path = root / "metadata.json"
    if not path.is_file():
        raise ConfigError(f"1X token data not found: expected {path} (a folder like val_v1.1 with metadata.json, "
                          "video.bin, segment_ids.bin)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} must hold a JSON object with num_images, s, vocab_size")
    for key in ("num_images", "s", "vocab_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise ConfigError(f"{path}: `{key}` must be a positive integer, got {meta.get(key)!r}")
    dtype = meta.get("token_dtype", "uint32")
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(f"{path}: `token_dtype` must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    m = GenieMeta(root, meta["num_images"], meta["s"], dtype, meta["vocab_size"], meta.get("hz"))
    video = root / "video.bin"
    expected = m.num_images * m.side * m.side * np.dtype(dtype).itemsize
    if not video.is_file() or video.stat().st_size != expected:
        have = f"{video.stat().st_size} bytes" if video.is_file() else "missing"
        raise ConfigError(f"{video}: expected {expected} bytes ({m.num_images} images of {m.side}x{m.side} {dtype}), "
                          f"found {have}")
    seg = root / "segment_ids.bin"
    if not seg.is_file() or seg.stat().st_size != m.num_images * 4:
        have = f"{seg.stat().st_size} bytes" if seg.is_file() else "missing"
        raise ConfigError(f"{seg}: expected {m.num_images * 4} bytes (int32 per image), found {have}")
    return m


def clip_starts(segments: np.ndarray, window: int, stride: int, filter_overlaps: bool) -> np.ndarray:
    """Start images of the clips: s + (window-1)*stride inside the data and in the same segment as s; with
    ``filter_overlaps``, s is dropped when s - i*stride (1 <= i < window) was already kept."""
    span = (window - 1) * stride
    n = len(segments)
    starts = [s for s in range(max(n - span, 0)) if segments[s] == segments[s + span]]
    if not filter_overlaps:
        return np.asarray(starts, dtype=np.int64)
    kept: set[int] = set()
    out = []
    for s in starts:
        if any(s - i * stride in kept for i in range(1, window)):
            continue
        kept.add(s)
        out.append(s)
    return np.asarray(out, dtype=np.int64)


class GenieClips(Dataset):
    """Clips (window, s, s) of int64 tokens; memory maps are opened lazily (one per worker process)."""

    def __init__(self, meta: GenieMeta, window: int = 16, stride: int = 15, filter_overlaps: bool = False):
        self.meta, self.window, self.stride = meta, window, stride
        segments = np.fromfile(meta.root / "segment_ids.bin", dtype=np.int32)
        self.starts = clip_starts(segments, window, stride, filter_overlaps)
        self._video: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        if self._video is None:
            m = self.meta
            self._video = np.memmap(m.root / "video.bin", dtype=m.dtype, mode="r",
                                    shape=(m.num_images, m.side, m.side))
        s = int(self.starts[i])
        frames = self._video[s: s + (self.window - 1) * self.stride + 1: self.stride]
        return (torch.from_numpy(np.asarray(frames, dtype=np.int64)),)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_video": None}


def genie_dataset(root: str | os.PathLike, token_shape: tuple[int, int, int], vocab_size: int, training: bool,
                  stride: int = 15) -> GenieClips:
    """The clips of a 1X folder for a model of ``token_shape`` (window = its frames); validation filters overlaps."""
    meta = read_meta(root)
    frames, h, w = token_shape
    if (meta.side, meta.side) != (h, w):
        raise ConfigError(f"{meta.root}: frames are {meta.side}x{meta.side} tokens but the model expects {h}x{w}")
    if meta.vocab_size > vocab_size:
        raise ConfigError(f"{meta.root}: vocab_size {meta.vocab_size} is larger than the model's {vocab_size}")
    check_token_ids(np.memmap(meta.root / "video.bin", dtype=meta.dtype, mode="r"), meta.root / "video.bin",
                    meta.vocab_size)
    ds = GenieClips(meta, frames, stride, filter_overlaps=not training)
    if len(ds) == 0:
        raise ConfigError(f"{meta.root}: no clip of {frames} frames every {stride} images fits inside one segment")
    return ds


def write_genie_folder(root: str | os.PathLike, video: np.ndarray, segments: np.ndarray, vocab_size: int,
                       hz: int = 30) -> Path:
    """Write tokens (N, s, s) and segment ids (N,) in the 1X layout (used by tests and for synthetic data)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(video, dtype=np.uint32).tofile(root / "video.bin")
    np.ascontiguousarray(segments, dtype=np.int32).tofile(root / "segment_ids.bin")
    meta = {"num_images": int(video.shape[0]), "s": int(video.shape[1]), "token_dtype": "uint32",
            "vocab_size": int(vocab_size), "hz": hz}
    (root / "metadata.json").write_text(json.dumps(meta))
    return root
