"""Datasets and loaders: the built-in digits set, token folders (masked-tokens), or user images through timm's
create_dataset/create_transform."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from moe_cli.config import DataCfg
from moe_cli.data.digits import digits
from moe_cli.data.genie import genie_dataset
from moe_cli.data.lm import lm_synthetic, lm_tokens, text_dataset
from moe_cli.data.tokens import synthetic_tokens, token_dataset, write_tokens
from moe_cli.errors import ConfigError
from moe_cli.models.causal_lm import CausalLM
from moe_cli.models.probe import input_size, model_data_config
from moe_cli.models.protocols import is_token_model
from moe_cli.runtime import atomic_write


def preprocessing(cfg: DataCfg, model: torch.nn.Module, stored: dict | None = None) -> dict:
    """The image preprocessing (mean, std, interpolation, crop_pct, crop_mode) to read images for ``model``: the
    recipe's `data` overrides, else ``stored`` (the checkpoint's: the source model's data config), else timm's
    data config of ``model`` itself."""
    return {**model_data_config(model), **(stored or {}), **cfg.preprocessing()}


def build_dataset(cfg: DataCfg, training: bool, model: torch.nn.Module, stored: dict | None = None) -> Dataset:
    """The train (``training``) or validation split of the recipe's data section, shaped for ``model``: images at
    its input size (or ``cfg.img_size``) with its preprocessing (:func:`preprocessing`; ``stored``: the
    checkpoint's data config), or token sequences checked against a token model."""
    split = cfg.train_split if training else cfg.val_split
    if cfg.name in ("lm-synthetic", "lm-tokens", "text"):
        vocab = getattr(model, "vocab_size", None)
        if not isinstance(vocab, int) or is_token_model(model):
            raise ConfigError(f"`data.name: {cfg.name}` holds text token sequences for a causal language model, not "
                              f"for {type(model).__name__}")
        if cfg.name == "lm-synthetic":
            return lm_synthetic(training, vocab)
        if cfg.name == "text":
            if cfg.root is None:
                raise ConfigError("`data.root` is required for data text (a folder with <split>.txt / .jsonl)")
            return text_dataset(cfg.root, split, cfg.tokenizer, cfg.seq_len, vocab)
        if cfg.root is None:
            raise ConfigError("`data.root` is required for data lm-tokens (a folder with <split>.json)")
        return lm_tokens(cfg.root, split, vocab)
    if cfg.name == "tokens":
        return _token_split(cfg, split, model)
    if cfg.name == "genie":
        if not is_token_model(model):
            raise ConfigError(f"1X token data (`data.name: genie`) needs a token model such as genie, not "
                              f"{type(model).__name__}")
        if cfg.root is None:
            raise ConfigError("`data.root` is required for data genie (the folder with train_v1.1/ and val_v1.1/)")
        return genie_dataset(Path(cfg.root) / split, model.token_shape, model.vocab_size, training, cfg.stride)
    if is_token_model(model):
        raise ConfigError(f"{type(model).__name__} reads discrete tokens: use `data.name: tokens` with a token "
                          f"folder, not the image dataset `{cfg.name or 'ImageFolder'}`")
    chans, h, _ = input_size(model)
    size = cfg.img_size or h
    if cfg.img_size and cfg.img_size != h and _fixed_size(model):
        raise ConfigError(f"`data.img_size` {cfg.img_size} does not match the model, which takes {h} px images "
                          "(set model.kwargs.img_size, or leave data.img_size unset)")
    pre = preprocessing(cfg, model, stored)
    if cfg.name == "digits":
        return digits("train" if training else "val", size, chans, cfg.augment and training, pre["mean"], pre["std"])
    ds = _timm_split(cfg, split, training, size, pre)
    _check_classes(ds, model, cfg.root)
    return ds


def _fixed_size(model: torch.nn.Module) -> bool:
    """A patch embedding built for one image size (not timm's dynamic_img_size / strict_img_size=False), or a model
    that says so (transformers vision models)."""
    if isinstance(getattr(model, "fixed_img_size", None), bool):
        return model.fixed_img_size
    pe = getattr(model, "patch_embed", None) or getattr(getattr(model, "encoder", None), "patch_embed", None)
    return pe is not None and getattr(pe, "strict_img_size", False) and not getattr(pe, "dynamic_img_size", False)


def _check_classes(ds: Dataset, model: torch.nn.Module, root: str | None) -> None:
    """An image folder must have class subfolders, and no more classes than a classifier's head has outputs."""
    class_to_idx = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    if not class_to_idx:
        return
    if "" in class_to_idx or "." in class_to_idx:
        raise ConfigError(f"{root}: images must sit in one subfolder per class (root/<class>/image.png); found "
                          "images directly in the folder")
    heads = getattr(model, "num_classes", 0)
    if isinstance(heads, int) and heads > 0 and len(class_to_idx) > heads:
        raise ConfigError(f"{root} has {len(class_to_idx)} classes but the model's head has {heads} outputs "
                          "(set model.kwargs.num_classes)")


BUILT_IN = ("digits", "lm-synthetic")  # data sets that need no files
TIMM_READERS = ("hfds/", "hfids/", "tfds/", "wds/", "torch/")  # timm dataset names (a reader, then the data's name)


def class_names(ds: Dataset) -> list[str] | None:
    """The class names of an image data set in label order (digits, an image folder, a timm / Hugging Face
    datasets reader that knows them), or None."""
    if isinstance(getattr(ds, "classes", None), list):
        return [str(c) for c in ds.classes]
    reader = getattr(ds, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None)
    if isinstance(class_to_idx, dict) and class_to_idx:
        return [str(c) for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    feature = getattr(getattr(getattr(reader, "dataset", None), "features", None), "get", lambda _k: None)(
        getattr(reader, "target_key", "label"))
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if isinstance(names, list) else None


def data_record(cfg: DataCfg, ds: Dataset) -> dict:
    """What a checkpoint keeps of the data it was trained on (`moe eval` and `moe inspect` read it by default, a
    model card names it): the data section, its folder made absolute, and the class names."""
    from moe_cli.checks import plain

    rec = plain(dataclasses.asdict(cfg))
    for key in ("root", "data_dir"):
        if rec.get(key) is not None and Path(rec[key]).exists():
            rec[key] = str(Path(rec[key]).resolve())
    if cfg.data_files is not None:
        rec["data_files"] = absolute_files(cfg.data_files)
    return {**rec, "classes": class_names(ds)}


def data_from_spec(spec: str, model: torch.nn.Module) -> DataCfg:
    """What a command-line data argument names, for ``model``: a built-in set (digits, lm-synthetic), a timm
    dataset name (``hfds/NAME``, ``torch/cifar100``, ...; ``hfds/imagefolder:FOLDER`` reads FOLDER, ``NAME:FOLDER``
    caches in FOLDER), or a folder
    (a token folder of sequences for a language model, else an ImageFolder)."""
    if spec in BUILT_IN:
        return DataCfg(name=spec)
    if spec.startswith(TIMM_READERS):
        name, _, path = spec.partition(":")
        if name.startswith("hfds/") and name.split("/", 1)[1] in PACKAGED:  # hfds/imagefolder:FOLDER
            return DataCfg(name=name, data_dir=path or None)
        return DataCfg(name=name, root=path or None)
    return DataCfg(name="lm-tokens", root=spec) if isinstance(model, CausalLM) else DataCfg(name="", root=spec)


def calibration_batches(model: torch.nn.Module, spec: str | DataCfg, batches: int, stored: dict | None = None,
                        batch_size: int = 64) -> list[torch.Tensor]:
    """``batches`` batches of model inputs from ``spec`` (a data section, or what :func:`data_from_spec` reads) for
    data-driven initialisation (router k-means, expert merging and pruning statistics), prepared for the model."""
    cfg = spec if isinstance(spec, DataCfg) else data_from_spec(spec, model)
    loader = val_loader(model, cfg, batch_size, torch.device("cpu"), stored)
    out = []
    for batch in loader:
        out.append(batch[0])
        if len(out) >= batches:
            break
    return out


def build_datasets(cfg: DataCfg, model: torch.nn.Module, stored: dict | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the recipe's data section."""
    return build_dataset(cfg, True, model, stored), build_dataset(cfg, False, model, stored)


def val_loader(model: torch.nn.Module, cfg: DataCfg, batch_size: int, device: torch.device,
               stored: dict | None = None) -> DataLoader:
    """The validation split shaped for ``model``, in order."""
    return make_loader(build_dataset(cfg, False, model, stored), batch_size, None, cfg.num_workers, device)


def _token_split(cfg: DataCfg, split: str, model: torch.nn.Module) -> Dataset:
    if not is_token_model(model):
        raise ConfigError(f"token data (`data.name: tokens`) needs a token model such as maskgit_video, "
                          f"not {type(model).__name__}")
    if cfg.root is None:
        raise ConfigError("`data.root` is required for token data (a folder with <split>.json)")
    if cfg.synthetic is not None:
        ensure_synthetic(cfg)
    return token_dataset(cfg.root, split, model.token_shape, model.vocab_size)


def ensure_synthetic(cfg: DataCfg) -> None:
    """Write the recipe's synthetic token splits into ``cfg.root`` unless they are there already."""
    g = cfg.synthetic
    for split, n, seed in ((cfg.train_split, g.train_sequences, g.seed), (cfg.val_split, g.val_sequences, g.seed + 1)):
        if not (Path(cfg.root) / f"{split}.json").is_file():
            write_tokens(cfg.root, split, synthetic_tokens(n, g.frames, g.height, g.width, g.vocab_size, seed),
                         g.vocab_size)


def _timm_split(cfg: DataCfg, split: str, training: bool, img_size: int, pre: dict) -> Dataset:
    from timm.data import create_dataset, create_transform

    if cfg.root is None and not cfg.name.startswith(("hfds/", "hfids/", "tfds/", "wds/")):
        raise ConfigError(f"`data.root` is required for dataset `{cfg.name or 'ImageFolder'}`")
    if cfg.root is not None and not cfg.name and not Path(cfg.root).is_dir():
        raise ConfigError(f"cannot open dataset `ImageFolder`: `data.root` {cfg.root} is not a folder")
    name = _hfds_name(cfg) if cfg.name.startswith("hfds/") else cfg.name
    try:
        ds = create_dataset(name, root=cfg.root, split=split, is_training=training, download=cfg.download)
    except (FileNotFoundError, RuntimeError, ValueError, OSError, AssertionError, ImportError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if (found := re.search(r"Unknown split \"?([^\".]+)\"?\. Should be one of \[(.*)\]", why)) is not None:
            key = "train_split" if training else "val_split"
            splits = [x.strip(" '\"") for x in found.group(2).split(",")]
            raise ConfigError(f"`{cfg.name}` has no split `{found.group(1)}` (it has {', '.join(splits)}); set "
                              f"`data.{key}` to one of them") from None
        hint = " (offline? download the data once with network, or point data.root at a copy)" if cfg.download \
            else (" (set data.download: true to fetch it)" if cfg.name.startswith("torch/") else "")
        raise ConfigError(f"cannot open dataset `{cfg.name or 'ImageFolder'}` at {cfg.root} (split "
                          f"`{split}`): {why}{hint}") from None
    if len(ds) == 0:
        raise ConfigError(f"dataset at {cfg.root} (split `{split}`) holds no images")
    ds.transform = create_transform(img_size, is_training=training and cfg.augment, mean=tuple(pre["mean"]),
                                    std=tuple(pre["std"]), interpolation=pre["interpolation"],
                                    crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"])
    return StrictImages(ds) if not cfg.name else ds


# datasets' packaged builders: they read the files they are given (data.data_dir), else the current directory
PACKAGED = ("imagefolder", "parquet", "csv", "json", "arrow", "webdataset", "audiofolder")


def _hfds_name(cfg: DataCfg) -> str:
    """The timm dataset name for ``hfds/<builder>``: a packaged builder reads ``data.data_dir`` or the files of
    ``data.data_files`` (the datasets library infers the builder from the files), refused in one line without
    either; a Hub dataset name as it is."""
    builder = cfg.name.split("/", 1)[1]
    _quiet_datasets()
    if cfg.data_files is not None:
        if builder not in PACKAGED:
            raise ConfigError(f"`data.data_files` names local files, read by a packaged builder (hfds/"
                              f"{', hfds/'.join(PACKAGED[:3])}, ...), not the Hub dataset `{builder}`")
        return "hfds/" + str(_files_config(cfg.data_files))
    if cfg.data_dir is not None:
        if builder not in PACKAGED:
            raise ConfigError(f"`data.data_dir` names local files, read by a packaged builder (hfds/"
                              f"{', hfds/'.join(PACKAGED[:3])}, ...), not the Hub dataset `{builder}`")
        if not Path(cfg.data_dir).is_dir():
            raise ConfigError(f"`data.data_dir` {cfg.data_dir} is not a folder")
        return "hfds/" + str(Path(cfg.data_dir).resolve())
    if builder in PACKAGED:
        raise ConfigError(f"`data.name: {cfg.name}` reads the files it is pointed at: set `data.data_dir` to the "
                          f"folder of {builder} files (train/, validation/ subfolders or file names per split) or "
                          "`data.data_files` to the files of each split; "
                          "`data.root` is the datasets cache. Without it the datasets library reads whatever sits "
                          "under the current directory")
    return cfg.name


def absolute_files(data_files: dict) -> dict[str, list[str]]:
    """``data.data_files`` with every path or glob made absolute (from the current directory), each split's as a
    list; a pattern that matches no file is refused in one line."""
    out = {}
    for split, given in data_files.items():
        out[split] = []
        for pattern in [given] if isinstance(given, str) else given:
            path = str(Path(pattern).expanduser().absolute())
            if not glob.glob(path, recursive=True):
                raise ConfigError(f"`data.data_files.{split}` {pattern} matches no file")
            out[split].append(path)
    return out


def _files_config(data_files: dict) -> Path:
    """A dataset folder for the datasets library whose README.md maps each split to its files (the library's own
    manual configuration: ``configs: data_files``), rewritten on every call under the temp folder; named by the
    files, so the library's cache of the prepared data is found again."""
    files = absolute_files(data_files)
    card = {"configs": [{"config_name": "default",
                         "data_files": [{"split": split, "path": paths} for split, paths in files.items()]}]}
    text = "---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n"
    folder = Path(tempfile.gettempdir()) / f"moe-cli-data-files-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    folder.mkdir(exist_ok=True)
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(text))
    return folder


def _quiet_datasets() -> None:
    """The datasets library's progress bars and logs are not ours to print."""
    try:
        import datasets
    except ImportError:
        return  # timm says how to install it
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()


MAX_IMAGE_PIXELS = 40_000_000  # an image folder's images: larger ones are refused (downscale them first)
DECODE_SIDE = 1024  # larger images are decoded (JPEG) or box-reduced to about this long side before the transform


def open_image(file, name: str):
    """An RGB image from ``file``, refused in one line naming ``name`` if it cannot be decoded or has more than
    MAX_IMAGE_PIXELS pixels (read from its header, before decoding); images far larger than the model's input are
    brought down to about DECODE_SIDE on their long side while they are decoded (JPEG draft) or right after (an
    integer box reduction), so that an 8000 px photo costs what a 1000 px one does."""
    from PIL import Image

    try:
        img = Image.open(file)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ConfigError(f"{name} is {w}x{h} pixels ({w * h / 1e6:.0f} MP), above moe-cli's limit of "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP per image; downscale the images (e.g. to "
                              f"{DECODE_SIDE} px)")
        if max(w, h) > 2 * DECODE_SIDE:
            img.draft("RGB", (DECODE_SIDE, DECODE_SIDE))  # JPEG: decode at a reduced scale; others: no-op
        img = img.convert("RGB")
        factor = max(img.size) // DECODE_SIDE
        return img.reduce(factor) if factor >= 2 else img
    except ConfigError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{name} is not a readable image ({why}); remove or replace it") from None


class StrictImages(Dataset):
    """An image folder read like timm's ImageDataset, except that a file that cannot be decoded (or is too large)
    is an error naming it (timm logs a warning and silently returns the next image instead)."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.reader = ds.reader

    @property
    def classes(self) -> list[str] | None:
        return class_names(self.ds)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.reader[index][:2]
        img = open_image(img, self.reader.filename(index, absolute=True))
        if self.ds.transform is not None:
            img = self.ds.transform(img)
        return img, -1 if target is None else target


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
