"""The built-in `digits` dataset: the UCI 8x8 handwritten digits (1,797 images, 10 classes), shipped as CSV.

Images are upsampled to the model's input size; the train/val split is fixed (seeded permutation, 80/20).
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 10
VAL_FRACTION = 0.2
SPLIT_SEED = 0


@functools.cache
def load_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 8, 8) float in [0, 1], labels (1797,) long) from the shipped file."""
    with resources.files("moe_cli.data").joinpath("digits.csv.gz").open("rb") as f:
        rows = [line.split(b",") for line in gzip.decompress(f.read()).splitlines() if line.strip()]
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.float32)
    return (values[:, :64] / 16.0).view(-1, 8, 8), values[:, 64].long()


class Digits(Dataset):
    """Normalised images (N, C, S, S) and labels; ``shift`` > 0 translates each image randomly by up to that
    many pixels (filled with the normalised background, ``fill`` (C,)), drawing from the global torch RNG so resumed
    runs stay exact."""

    classes = [str(i) for i in range(10)]

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0, fill: torch.Tensor | None = None):
        self.images, self.labels, self.shift = images, labels, shift
        self.fill = fill if fill is not None else torch.full((images.shape[1],), -1.0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.shift:
            s = self.shift
            dy, dx = (torch.randint(0, 2 * s + 1, (2,))).tolist()
            padded = self.fill.view(-1, 1, 1).expand(-1, x.shape[1] + 2 * s, x.shape[2] + 2 * s).clone()
            padded[:, s:s + x.shape[1], s:s + x.shape[2]] = x
            x = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        return x, self.labels[i]


def digits(split: str, img_size: int = 32, in_chans: int = 3, augment: bool = False,
           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Digits:
    """The `train` or `val` split, shape (N, in_chans, img_size, img_size), normalised with the model's ``mean``
    and ``std`` (per channel, from pixels in [0, 1]; the default 0.5 / 0.5 gives [-1, 1])."""
    images, labels = load_raw()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = int(round(len(labels) * VAL_FRACTION))
    idx = perm[n_val:] if split == "train" else perm[:n_val]
    x = F.interpolate(images[idx].unsqueeze(1), size=(img_size, img_size), mode="bilinear", align_corners=False)
    scale, shift = per_channel(1 / torch.tensor(std), in_chans), per_channel(torch.tensor(mean) / torch.tensor(std),
                                                                            in_chans)
    x = (x.expand(-1, in_chans, -1, -1) * scale.view(1, -1, 1, 1) - shift.view(1, -1, 1, 1)).contiguous()
    return Digits(x, labels[idx], shift=max(1, img_size // 10) if augment else 0, fill=-shift)


def per_channel(values: torch.Tensor, chans: int) -> torch.Tensor:
    """Three RGB values for ``chans`` channels (grey models take their mean)."""
    values = values.float()
    return values if chans == values.numel() else values.mean().expand(chans)
