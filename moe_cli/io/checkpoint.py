"""moe-cli checkpoints: ``model.safetensors`` whose ``__metadata__`` holds everything needed to rebuild the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from moe_cli.config import PREPROCESS_FIELDS, check_preprocessing
from moe_cli.errors import CheckpointError, ConfigError, ModelSourceError
from moe_cli.models import hf_models
from moe_cli.models.surgery import apply_moe, layout_of_model
from moe_cli.moe.config import MoELayout
from moe_cli.runtime import Precision, atomic_write, parse_size

FORMAT = "moe-cli/1"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # Hugging Face's sharded layout: model-0000i-of-0000N.safetensors


class Checkpoint:
    """A model together with what is needed to rebuild it: timm architecture, source, task and task settings.

    The MoE layout (``moe``: the layers' shared config, their module names and shapes) is read from the model's
    MoE layers, which own their config, so it never drifts from what the model does; ``init`` records how the
    experts were made (copy, drop, split)."""

    def __init__(self, model: nn.Module, architecture: dict, source: str = "", task: str = "classify",
                 extra: dict | None = None, task_config: dict | None = None, init: str = "copy",
                 data_config: dict | None = None):
        self.model = model
        self.architecture = architecture  # {"name": timm model name, "kwargs": {...}}
        self.source = source
        self.task = task
        self.extra = dict(extra or {})
        self.task_config = dict(task_config or {})  # the task's eval settings (masked-tokens: decoder, masks)
        self.init = init
        # the source model's image preprocessing (timm data config: mean, std, interpolation, crop), kept from the
        # dense source through upcycling and training so every later command reads images as it was trained on
        self.data_config = dict(data_config) if data_config else None

    @property
    def moe(self) -> MoELayout | None:
        return layout_of_model(self.model, self.init)

    def metadata(self) -> dict[str, str]:
        from moe_cli import __version__

        return {
            "format": FORMAT,
            "moe_cli_version": __version__,
            "source": self.source,
            "architecture": json.dumps(self.architecture),
            "moe": json.dumps(self.moe.to_dict() if self.moe else None),
            "task": self.task,
            "task_config": json.dumps(self.task_config),
            "extra": json.dumps(self.extra),
            "data_config": json.dumps(self.data_config),
        }


def weights_path(path: str | os.PathLike) -> Path:
    """``dir/`` -> ``dir/model.safetensors`` (or ``dir/model.safetensors.index.json`` for sharded weights); a
    ``.safetensors`` file (or an index) stays as it is; another file is an error."""
    p = Path(path)
    if p.suffix == ".safetensors" or p.name == INDEX_NAME:
        return p
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file() and (p / INDEX_NAME).is_file():
        return p / INDEX_NAME
    if p.is_file():
        raise CheckpointError(f"{p} is not a .safetensors file: moe-cli reads safetensors checkpoints (a folder "
                              "with model.safetensors, or a .safetensors file)")
    return p / WEIGHTS_NAME


def save(ckpt: Checkpoint, path: str | os.PathLike, dtype: str | None = None,
         tensors: dict[str, torch.Tensor] | None = None, max_shard_size: str | int | None = None) -> Path:
    """Write ``ckpt`` to ``path`` (a folder, or a ``.safetensors`` file), optionally casting floats to ``dtype``.
    ``tensors``: the model's whole state dict when ``ckpt.model`` is sharded over ranks (gathered by the trainer).
    A folder's weights above ``max_shard_size`` are written in Hugging Face's sharded layout (shards, then the
    index holding the moe-cli metadata); returns the weights file or the index."""
    max_shard = parse_size(max_shard_size)
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        weights_path(path)  # its one-line error
    if max_shard is not None and path.suffix == ".safetensors":
        raise ConfigError(f"sharded weights are written into a folder; {path} is a .safetensors file name")
    target = path / WEIGHTS_NAME if path.suffix != ".safetensors" else path
    if dtype is not None and dtype not in set(Precision):
        raise ConfigError(f"dtype must be one of {', '.join(Precision)}, got {dtype!r}")
    cast = Precision(dtype).dtype if dtype else None
    tied = tied_names(ckpt.model)
    out = {}
    for name, t in (tensors if tensors is not None else ckpt.model.state_dict()).items():
        if name in tied:  # a tied weight (an LM's head is its embedding): stored once, under its first name
            continue
        t = t.detach()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        out[name] = t.contiguous().cpu()
    meta = ckpt.metadata() | ({"dtype": dtype} if dtype else {})
    if max_shard is not None:
        split = shard_plan({k: t.numel() * t.element_size() for k, t in out.items()}, max_shard)
        if split.is_sharded:
            for name, keys in split.filename_to_tensors.items():
                write_shard(path, name, {k: out[k] for k in keys})
            return write_index(path, meta, split)
    if path.suffix != ".safetensors":
        return write_single(path, out, meta)
    atomic_write(target, lambda tmp: safetensors.torch.save_file(out, tmp, metadata=meta))
    return target


def shard_plan(sizes: dict[str, int], max_shard_size: int):
    """Hugging Face's split of a state dict into shard files (huggingface_hub's splitter: tensors in order,
    a new file when the next would pass ``max_shard_size``), from each tensor's size in bytes alone, so processes
    that each hold a part of a model plan the same files."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(sizes, get_storage_size=int, max_shard_size=max_shard_size,
                                                filename_pattern="model{suffix}.safetensors")


def write_single(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """A folder's one weights file holding the metadata; an earlier sharded save in the folder is removed after
    it."""
    target = folder / WEIGHTS_NAME
    atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
    for stale in (folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    return target


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """One shard file of a sharded save (written to a temporary name and renamed)."""
    atomic_write(folder / name, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))


def write_index(folder: Path, meta: dict[str, str], split) -> Path:
    """The index of a sharded save, written after every shard: a reader sees the old checkpoint or the new one,
    never half of one. The moe-cli metadata lives in it; files of an earlier save in the folder are removed."""
    index = {"metadata": {**meta, "total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
    atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    (folder / WEIGHTS_NAME).unlink(missing_ok=True)  # an earlier unsharded save in the same folder
    for stale in folder.glob("model-*-of-*.safetensors"):
        if stale.name not in split.filename_to_tensors:
            stale.unlink()
    return folder / INDEX_NAME


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: itself, or the shards its index names (in order)."""
    if path.name != INDEX_NAME:
        return [path]
    return [path.parent / name for name in dict.fromkeys(_index(path)["weight_map"].values())]


def _index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors index ({str(e).splitlines()[0]})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{path} is not a safetensors index (no `weight_map`)")
    return index


def tied_names(model: nn.Module) -> set[str]:
    """The parameter names that are another name's tensor (tied weights), all but the first of each group."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return tied


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (of a sharded checkpoint: its index's ``metadata``); a missing or
    corrupt file is a CheckpointError."""
    if path.name == INDEX_NAME and path.is_file():
        meta = _index(path).get("metadata") or {}
        return {k: v for k, v in meta.items() if isinstance(v, str)}
    if not path.is_file():
        run = path.parent
        for sub in ("final", "last"):  # a training run's folder: its checkpoints are inside
            if path.name == WEIGHTS_NAME and (run / sub / WEIGHTS_NAME).is_file():
                raise CheckpointError(f"{run} is a training run's folder, not a checkpoint; use {run / sub}")
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in shard_files(path):
        try:
            out.update(safetensors.torch.load_file(str(file), device="cpu"))
        except Exception as e:
            raise CheckpointError(f"{file} is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    return out


def is_moe_checkpoint(path: str | os.PathLike) -> bool:
    p = weights_path(path)
    return p.is_file() and read_metadata(p).get("format") == FORMAT


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the safetensors file ``path`` into ``model`` strictly (``safetensors.torch.load_model``; tensors are
    cast to the model's dtype, so 16-bit exports load into an fp32 model). Key or shape mismatches are one-line
    CheckpointErrors naming the first one, checked from the file's header before anything is read."""
    shapes = {}
    for file in shard_files(path):
        try:
            with safetensors.safe_open(str(file), framework="pt") as f:
                shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 — not a dict
        except Exception as e:
            raise CheckpointError(f"{file} is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    own = model.state_dict()
    tied = tied_names(model)  # stored once, under the first name
    missing = [k for k in own if k not in shapes and k not in tied]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected:
        what = f"missing `{missing[0]}`" if missing else f"unexpected `{unexpected[0]}`"
        raise CheckpointError(f"{path} does not match the architecture: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, shape in shapes.items():
        if shape != tuple(own[k].shape):
            raise CheckpointError(f"{path} does not match the architecture: `{k}` has shape {shape}, "
                                  f"the model expects {tuple(own[k].shape)}")
    if path.name != INDEX_NAME:
        safetensors.torch.load_model(model, str(path), strict=True)
        return
    for file in shard_files(path):  # one shard in memory at a time
        part = safetensors.torch.load_file(str(file), device="cpu")
        model.load_state_dict(part, strict=False, assign=False)
        del part


# timm.create_model keywords that read files, fetch weights or change how a model is loaded rather than what it
# is: never taken from a checkpoint's metadata (a downloaded checkpoint must not make moe-cli open other files)
NOT_ARCHITECTURE = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                              "pretrained_strict", "cache_dir", "features_only", "scriptable", "exportable", "no_jit"})


def architecture_kwargs(kwargs: dict, where: str) -> dict:
    """``kwargs`` from checkpoint metadata, refused in one line unless they are plain architecture arguments."""
    def scan(d: dict, path: str) -> None:
        for key, value in d.items():
            if key in NOT_ARCHITECTURE or key.startswith("_"):
                raise CheckpointError(f"{where}: `{path}.{key}` is not an architecture argument; moe-cli does not "
                                      "pass it on from a checkpoint")
            if not _plain_json(value):
                raise CheckpointError(f"{where}: `{path}.{key}` must be a number, string, list or mapping")
            if isinstance(value, dict):  # nested model kwargs (mae_vit's encoder_kwargs)
                scan(value, f"{path}.{key}")

    scan(kwargs, "architecture.kwargs")
    return kwargs


def _plain_json(value) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    return False


def create_timm(name: str, kwargs: dict) -> nn.Module:
    """A timm architecture by its registered name, without weights. Names timm would resolve by opening files or
    the Hub (``local-dir:``, ``hf-hub:``) are refused: a checkpoint's metadata must not make moe-cli read other
    files."""
    if not isinstance(name, str) or ":" in name or not timm.is_model(name.split(".", 1)[0]):
        raise ModelSourceError(f"`{name}` is not a registered timm architecture (the name must not point at "
                               "files or the Hub)")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError, MemoryError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__  # KeyError: an unknown act_layer name, ...
        raise ModelSourceError(f"cannot build timm model `{name}` with {kwargs}: {why}") from None


def create_model(name: str, kwargs: dict) -> nn.Module:
    """The architecture a checkpoint names, without weights: a timm name, or ``transformers:ClassName`` with its
    config (one of the classes moe-cli lists; :mod:`moe_cli.models.hf_models`)."""
    if isinstance(name, str) and name.startswith(hf_models.PREFIX):
        return hf_models.build(name, kwargs)
    return create_timm(name, kwargs)


def load_checkpoint(path: str | os.PathLike, weights: bool = True) -> Checkpoint:
    """Rebuild the exact model saved by :func:`save` from the file alone (``weights`` False: its architecture and
    metadata only, for a caller that fills the weights itself)."""
    target = weights_path(path)
    meta = read_metadata(target)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{target} is not a moe-cli checkpoint (no `format: {FORMAT}` in its metadata); "
                              "load plain weights with --arch NAME")
    try:
        arch = json.loads(meta["architecture"])
        moe_dict = json.loads(meta["moe"])
        extra = json.loads(meta.get("extra", "{}"))
        task_config = json.loads(meta.get("task_config", "{}"))
        data_config = json.loads(meta.get("data_config", "null"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{target}: corrupt moe-cli metadata ({e})") from None
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs", {}), dict)):
        raise CheckpointError(f"{target}: metadata `architecture` must be {{\"name\": str, \"kwargs\": {{...}}}}")
    if data_config is not None:
        if not isinstance(data_config, dict):
            raise CheckpointError(f"{target}: metadata `data_config` must be a mapping, got {data_config!r}")
        data_config = check_preprocessing({k: v for k, v in data_config.items() if k in PREPROCESS_FIELDS},
                                          lambda key: f"{target}: metadata `data_config.{key}`")
    model = create_model(arch["name"], architecture_kwargs(arch.get("kwargs", {}), str(target)))
    if moe_dict is not None:
        def label(name: str) -> str:
            return f"{target}: metadata `moe{'.' + name if name else ''}`"

        layout = MoELayout.from_dict(moe_dict, label)
        apply_moe(model, layout, shapes_only=True)
    if weights:
        load_weights(model, target)  # a 16-bit export loads into the fp32 model: runs use their own precision
    return Checkpoint(model.eval(), arch, meta.get("source", ""), meta.get("task", "classify"), extra,
                      task_config, init=layout.init if moe_dict is not None else "copy", data_config=data_config)
