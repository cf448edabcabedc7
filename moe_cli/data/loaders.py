"""Datasets and loaders: the built-in digits set, or user data through timm's create_dataset/create_transform."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from moe_cli.data.digits import digits
from moe_cli.errors import ConfigError
from moe_cli.models.probe import input_size
from moe_cli.train.recipe import DataCfg


def build_dataset(cfg: DataCfg, training: bool, img_size: int, in_chans: int = 3) -> Dataset:
    """The train (``training``) or validation split of the recipe's data section."""
    if cfg.name == "digits":
        return digits("train", img_size, in_chans, cfg.augment) if training else digits("val", img_size, in_chans)
    return _timm_split(cfg, cfg.train_split if training else cfg.val_split, training, img_size)


def build_datasets(cfg: DataCfg, img_size: int, in_chans: int = 3) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the recipe's data section."""
    return build_dataset(cfg, True, img_size, in_chans), build_dataset(cfg, False, img_size, in_chans)


def val_loader(model: torch.nn.Module, cfg: DataCfg, batch_size: int, device: torch.device) -> DataLoader:
    """The validation split at the model's input size (or ``cfg.img_size``), in order."""
    chans, h, _ = input_size(model)
    return make_loader(build_dataset(cfg, False, cfg.img_size or h, chans), batch_size, None, cfg.num_workers,
                       device)


def _timm_split(cfg: DataCfg, split: str, training: bool, img_size: int) -> Dataset:
    from timm.data import create_dataset, create_transform

    if cfg.root is None and not cfg.name.startswith(("hfds/", "hfids/", "tfds/", "wds/")):
        raise ConfigError(f"`data.root` is required for dataset `{cfg.name or 'ImageFolder'}`")
    if cfg.root is not None and not cfg.name and not Path(cfg.root).is_dir():
        raise ConfigError(f"cannot open dataset `ImageFolder`: `data.root` {cfg.root} is not a folder")
    try:
        ds = create_dataset(cfg.name, root=cfg.root, split=split, is_training=training)
    except (FileNotFoundError, RuntimeError, ValueError, OSError, AssertionError) as e:
        raise ConfigError(f"cannot open dataset `{cfg.name or 'ImageFolder'}` at {cfg.root} (split "
                          f"`{split}`): {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise ConfigError(f"dataset at {cfg.root} (split `{split}`) holds no images")
    ds.transform = create_transform(img_size, is_training=training and cfg.augment,
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return ds


class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch shuffling (DistributedSampler: seed + epoch, sharded by rank) that can start
    mid-epoch, so a resumed run sees exactly the samples the interrupted one would have."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.start:])

    def __len__(self) -> int:
        return len(self.inner) - self.start


def make_loader(ds: Dataset, batch_size: int, sampler: Sampler | None, num_workers: int, device: torch.device,
                shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, drop_last=False)
