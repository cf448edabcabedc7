"""Discrete-token video data: a memory-mapped array (sequences, frames, H, W) plus a JSON file describing it.

A split ``S`` in folder ``root`` is ``root/S.json``::

    {"file": "S.bin", "shape": [N, F, H, W], "dtype": "uint16", "vocab_size": 1024}

with ``file`` relative to the folder and the array stored C-order, no header (``ndarray.tofile``).
Also here: a synthetic generator (moving token patterns); its decoder is moe_cli.models.decoders.palette_decoder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moe_cli.errors import ConfigError
from moe_cli.models.decoders import palette_decoder  # noqa: F401  (recipes name it moe_cli.data.tokens:palette_decoder)
from moe_cli.runtime import atomic_write

DTYPES = ("uint8", "uint16", "int16", "int32", "int64")


@dataclass(frozen=True)
class TokenSpec:
    path: Path  # the JSON file
    file: Path  # the raw array
    shape: tuple[int, ...]  # (sequences, frames, H, W), or (sequences, length) for language models
    dtype: str
    vocab_size: int


SHAPES = {4: "[sequences, frames, H, W]", 2: "[sequences, length]"}


def read_spec(root: str | os.PathLike, split: str, dims: int = 4) -> TokenSpec:
    """Parse and check ``root/split.json`` (``dims``: 4 for video tokens, 2 for text); every problem is a one-line
    ConfigError naming the file and field."""
    path = Path(root) / f"{split}.json"
    if not path.is_file():
        found = sorted(p.stem for p in Path(root).glob("*.json")) if Path(root).is_dir() else []
        hint = f" (found splits: {', '.join(found)})" if found else ""
        raise ConfigError(f"token split `{split}` not found: expected {path}{hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} must hold a JSON object with file, shape, dtype, vocab_size")
    for key in ("file", "shape", "dtype", "vocab_size"):
        if key not in meta:
            raise ConfigError(f"{path}: missing `{key}` (expected file, shape {SHAPES[dims]}, dtype, vocab_size)")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == dims and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ConfigError(f"{path}: `shape` must be {dims} positive integers {SHAPES[dims]}, got {shape!r}")
    if meta["dtype"] not in DTYPES:
        raise ConfigError(f"{path}: `dtype` must be one of {', '.join(DTYPES)}, got {meta['dtype']!r}")
    vocab = meta["vocab_size"]
    if not isinstance(vocab, int) or vocab < 2:
        raise ConfigError(f"{path}: `vocab_size` must be an integer >= 2, got {vocab!r}")
    file = path.parent / meta["file"]
    if not file.is_file():
        raise ConfigError(f"{path}: `file` {file} does not exist")
    expected = math.prod(shape) * np.dtype(meta["dtype"]).itemsize
    if file.stat().st_size != expected:
        raise ConfigError(f"{path}: {file.name} holds {file.stat().st_size} bytes, but shape {shape} of "
                          f"{meta['dtype']} needs {expected}")
    return TokenSpec(path, file, tuple(shape), meta["dtype"], vocab)


class TokenDataset(Dataset):
    """Sequences (frames, H, W) as int64 tensors, read lazily from the memory map (one map per worker process)."""

    def __init__(self, spec: TokenSpec):
        self.spec = spec
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return self.spec.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        if self._array is None:
            self._array = np.memmap(self.spec.file, dtype=self.spec.dtype, mode="r", shape=self.spec.shape)
        return (torch.from_numpy(np.asarray(self._array[i], dtype=np.int64)),)

    def __getstate__(self) -> dict:  # worker processes open their own map
        return {**self.__dict__, "_array": None}


def token_dataset(root: str | os.PathLike, split: str, token_shape: tuple[int, int, int], vocab_size: int,
                  check_values: bool = True) -> TokenDataset:
    """The split, checked against the model: same (frames, H, W), vocabulary no larger than the model's."""
    spec = read_spec(root, split)
    if tuple(spec.shape[1:]) != tuple(token_shape):
        raise ConfigError(f"{spec.path}: sequences are {list(spec.shape[1:])} (frames, H, W) but the model expects "
                          f"{list(token_shape)}")
    if spec.vocab_size > vocab_size:
        raise ConfigError(f"{spec.path}: vocab_size {spec.vocab_size} is larger than the model's {vocab_size}")
    ds = TokenDataset(spec)
    if check_values:
        check_token_ids(np.memmap(spec.file, dtype=spec.dtype, mode="r", shape=spec.shape), spec.path,
                        spec.vocab_size)
    return ds


def check_token_ids(tokens: np.ndarray, where: Path, vocab_size: int) -> None:
    """Every id in [0, vocab_size) (one pass over the memory map): an id out of range would index past the
    embedding, and the model's own [MASK] id (= its vocabulary size) must not be trained on as data."""
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(f"{where}: token id {bad} found, but ids must be in [0, {vocab_size}) (vocab_size)")


def write_tokens(root: str | os.PathLike, split: str, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write ``tokens`` (N, F, H, W) as ``root/split.bin`` + ``root/split.json`` (each written atomically)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "int64"
    data = np.ascontiguousarray(tokens, dtype=dtype)
    meta = {"file": f"{split}.bin", "shape": list(data.shape), "dtype": dtype, "vocab_size": int(vocab_size)}
    atomic_write(root / f"{split}.bin", data.tofile)
    atomic_write(root / f"{split}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return root / f"{split}.json"


def synthetic_tokens(sequences: int, frames: int, height: int, width: int, vocab_size: int,
                     seed: int = 0) -> np.ndarray:
    """Moving patterns: each sequence is a grid of 2x2 blocks of one token each (Zipf-like token frequencies),
    shifted by a fixed per-sequence velocity in {-1, 0, 1}^2 each frame (wrapping). A masked token is thus
    predictable from its block-mates in the same frame and from the other frames, so a model has structure in
    space and time to learn beyond token frequencies."""
    gen = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    bh, bw = (height + 1) // 2, (width + 1) // 2
    blocks = torch.multinomial(freq, sequences * bh * bw, replacement=True, generator=gen).view(sequences, bh, bw)
    base = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :height, :width]
    vel = torch.randint(-1, 2, (sequences, 2), generator=gen)
    out = torch.empty(sequences, frames, height, width, dtype=torch.int64)
    for i in range(sequences):
        for t in range(frames):
            out[i, t] = torch.roll(base[i], shifts=(t * int(vel[i, 0]), t * int(vel[i, 1])), dims=(0, 1))
    return out.numpy()
