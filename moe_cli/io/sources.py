"""Model sources: a timm name, ``hf-hub:org/name``, a local ``.safetensors`` file or folder, a moe-cli checkpoint."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import timm
from timm.models import load_model_config_from_hf
from torch import nn

from moe_cli.checks import Label, argument
from moe_cli.errors import ModelSourceError
from moe_cli.io.checkpoint import (
    WEIGHTS_NAME,
    Checkpoint,
    architecture_kwargs,
    create_timm,
    is_moe_checkpoint,
    load_checkpoint,
    load_weights,
    read_metadata,
    weights_path,
)
from moe_cli.io.hub import DOWNLOAD_ERRORS, download, download_hint, is_moe_cli_repo, is_repo_id, quiet_hub
from moe_cli.models import hf_models
from moe_cli.models.genie import GenieConfig, is_genie_config
from moe_cli.models.overrides import apply_overrides
from moe_cli.models.probe import model_data_config

# short forms users type -> the timm default they mean
ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "eva02_tiny": "eva02_tiny_patch14_224",
    "eva02_small": "eva02_small_patch14_224",
    "mixer_small": "mixer_s16_224",
    "mixer_base": "mixer_b16_224",
}

PROCESSOR = "preprocessor_config.json"  # a transformers vision repository's image preprocessing


def resolve_timm_name(name: str) -> str:
    """A registered timm name, an alias, or the ``*_224`` default among names starting with ``name_``."""
    base = name.split(".", 1)[0]  # pretrained tag: vit_small_patch16_224.augreg_in21k
    if timm.is_model(base):
        return name
    if base in ALIASES:
        return ALIASES[base] + name[len(base):]
    prefixed = timm.list_models(f"{base}_*")
    if prefixed:
        best = sorted(prefixed, key=lambda n: (not n.endswith("_224"), len(n), n))[0]
        return best + name[len(base):]
    close = difflib.get_close_matches(base, timm.list_models() + list(ALIASES), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else "; see `timm.list_models()`"
    raise ModelSourceError(f"unknown model `{name}`: not a timm model name, hf-hub:org/name or existing file{hint}")


def built_kwargs(model, kwargs: dict) -> dict:
    """The kwargs that rebuild ``model``, including the head size timm took from a pretrained config."""
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs = {**kwargs, "num_classes": model.num_classes}
    return kwargs


def _from_timm(name: str, pretrained: bool, kwargs: dict) -> Checkpoint:
    resolved = resolve_timm_name(name)
    try:
        with quiet_hub():
            model = timm.create_model(resolved, pretrained=pretrained, **kwargs)
    except DOWNLOAD_ERRORS as e:
        raise download_hint(f"pretrained weights for `{resolved}`", e) from None
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ModelSourceError(f"cannot build `{resolved}` with {kwargs}: {str(e).splitlines()[0]}") from None
    arch = {"name": resolved.split(".", 1)[0], "kwargs": built_kwargs(model, kwargs)}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    origin = {"base_model": cfg.get("hf_hub_id"), "license": cfg.get("license")} if pretrained else {}
    return Checkpoint(model, arch, source=resolved, data_config=model_data_config(model),
                      extra={k: v for k, v in origin.items() if v})


def _from_genie(config: dict, weights: Path | None, source: str, kwargs: dict) -> Checkpoint:
    """A GENIE model from its released ``config.json`` fields, weights loaded strictly (a missing or unexpected
    key is a one-line error naming it)."""
    try:
        cfg = GenieConfig.from_dict({**config, **kwargs})
    except (TypeError, ValueError) as e:
        raise ModelSourceError(f"{source}: not a usable GENIE config ({str(e).splitlines()[0]})") from None
    arch = {"name": "genie", "kwargs": {k: v for k, v in cfg.to_dict().items() if k != "factored_vocab_size"}}
    model = create_timm("genie", arch["kwargs"])
    if weights is not None:
        load_weights(model, weights)
    return Checkpoint(model, arch, source=source, data_config=model_data_config(model))


def _from_transformers(where: str, folder: str, config: dict, pretrained: bool, kwargs: dict,
                       processor: dict | None) -> Checkpoint:
    """A transformers model (a local folder, or a Hub repository through the cache), as a dense checkpoint; a
    vision model's ``processor`` (preprocessor_config.json) becomes its data config."""
    model, task = hf_models.from_pretrained(folder, config, pretrained, kwargs, processor)
    data_config = model_data_config(model) if task == "classify" else None
    return Checkpoint(model, hf_models.architecture(model), source=where, task=task, data_config=data_config)


def _json_file(path: Path) -> dict | None:
    """A JSON object file, None if absent; invalid JSON is one line naming the file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{path} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{path} must be a JSON object")
    return value


def _hub_json(hub_id: str, filename: str = "config.json") -> dict | None:
    """A JSON file of the repository (from the local cache when offline), or None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        with quiet_hub():
            path = hf_hub_download(hub_id, filename)
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of the next): not "no such file"
        raise
    except EntryNotFoundError:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelSourceError(f"{filename} of `{hub_id}` is not valid JSON") from None


def _from_hub(spec: str, pretrained: bool, kwargs: dict) -> Checkpoint:
    """A model from the Hub; its repository is the checkpoint's base model (when its weights were read)."""
    ckpt = _read_hub(spec, pretrained, kwargs)
    if pretrained and ckpt.moe is None and "base_model" not in ckpt.extra:
        ckpt.extra["base_model"] = spec.split(":", 1)[1]
    return ckpt


def _read_hub(spec: str, pretrained: bool, kwargs: dict) -> Checkpoint:
    hub_id = spec.split(":", 1)[1]
    if not is_repo_id(hub_id):
        raise ModelSourceError(f"`{spec}` is not a Hub id; expected hf-hub:org/name")
    try:
        config = _hub_json(hub_id)
    except DOWNLOAD_ERRORS as e:
        if not pretrained:  # the architecture itself is in the repository's config.json
            raise ModelSourceError(f"`{spec}` without pretrained weights still needs the repository's config.json "
                                   "(its architecture), which could not be fetched and is not in the local cache; "
                                   "name the architecture instead (e.g. genie_35m, or a timm model name)") from None
        raise download_hint(f"`{hub_id}` from the Hugging Face Hub", e) from None
    if is_moe_cli_repo(config):  # a checkpoint pushed by `moe push`
        return load_checkpoint(download(hub_id))
    if hf_models.is_transformers_config(config):  # a transformers model: its own class reads the repository
        task = hf_models.task_of(config, f"`{spec}`")
        try:
            with quiet_hub():
                processor = _hub_json(hub_id, PROCESSOR) if task == "classify" else None
                return _from_transformers(spec, hub_id, config, pretrained, kwargs, processor)
        except DOWNLOAD_ERRORS as e:
            raise download_hint(f"`{hub_id}` from the Hugging Face Hub", e) from None
    if is_genie_config(config):  # a released 1X GENIE repository: flat config.json + model.safetensors
        from huggingface_hub import hf_hub_download

        weights = None
        if pretrained:
            try:
                with quiet_hub():
                    weights = Path(hf_hub_download(hub_id, WEIGHTS_NAME))
            except DOWNLOAD_ERRORS as e:
                raise download_hint(f"the weights of `{hub_id}`", e) from None
        return _from_genie(config, weights, spec, kwargs)
    try:
        with quiet_hub():
            _, arch_name, model_args = load_model_config_from_hf(hub_id)
            model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except DOWNLOAD_ERRORS as e:
        raise download_hint(f"`{hub_id}` from the Hugging Face Hub", e) from None
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise ModelSourceError(f"cannot build `{spec}`: {str(e).splitlines()[0]}") from None
    arch = {"name": arch_name, "kwargs": built_kwargs(model, {**(model_args or {}), **kwargs})}
    return Checkpoint(model, arch, source=spec, data_config=model_data_config(model))


def _folder_config(path: Path) -> dict | None:
    """A folder's config.json, if it has a readable one."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # _from_file names the file


def _from_file(path: Path, arch: str | None, kwargs: dict) -> Checkpoint:
    """Plain weights (a .safetensors file, or a folder with model.safetensors and optionally timm's config.json)."""
    target = weights_path(path)
    meta = read_metadata(target)
    if arch is None:
        arch = meta.get("architecture")
        config = path / "config.json" if path.is_dir() else None
        if arch is None and config is not None and config.is_file():
            try:
                cfg = json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelSourceError(f"{config} is not valid JSON ({getattr(e, 'msg', e)}); fix it or name the "
                                       "architecture with --arch") from None
            if is_genie_config(cfg):
                return _from_genie(cfg, target, str(path), kwargs)
            if not isinstance(cfg, dict) or not isinstance(cfg.get("model_args", {}), dict):
                raise ModelSourceError(f"{config} must be a JSON object with `architecture` and optionally "
                                       "`model_args` (a mapping), as timm writes it")
            arch = cfg.get("architecture")
            kwargs = {**architecture_kwargs(cfg.get("model_args", {}), str(config)), **kwargs}
    if arch is not None and not isinstance(arch, str):
        raise ModelSourceError(f"{target}: the architecture must be a timm model name, got {arch!r}")
    if not arch:
        raise ModelSourceError(f"{target} has no architecture in its metadata and no timm config.json beside it "
                               "(architecture, model_args); `moe upcycle` also takes --arch NAME (a timm model)")
    name = resolve_timm_name(arch)
    model = create_timm(name, kwargs)
    load_weights(model, target)
    return Checkpoint(model, {"name": name, "kwargs": kwargs}, source=str(path), data_config=model_data_config(model))


def load_source(spec: str, pretrained: bool = True, arch: str | None = None,
                model_kwargs: dict | None = None) -> Checkpoint:
    """Resolve a model source to a :class:`Checkpoint` (``moe`` set only for moe-cli checkpoints)."""
    kwargs = dict(model_kwargs or {})
    path = Path(spec)
    if spec.startswith("hf-hub:"):
        return _from_hub(spec, pretrained, kwargs)
    if spec.startswith(hf_models.PREFIX):  # a transformers class from its config (model.kwargs), fresh weights
        if pretrained:
            raise ModelSourceError(f"`{spec}` names an architecture, not weights: set `pretrained: false` (and its "
                                   "config in model.kwargs), or give a transformers folder or hf-hub:org/name")
        model = hf_models.build(spec, kwargs)
        task = "classify" if hasattr(model, "num_classes") else "causal-lm"
        return Checkpoint(model, hf_models.architecture(model), source=spec, task=task,
                          data_config=model_data_config(model) if task == "classify" else None)
    if path.exists():
        if is_moe_checkpoint(path):
            return load_checkpoint(path)
        config = _folder_config(path)
        if hf_models.is_transformers_config(config) and arch is None:
            task = hf_models.task_of(config, str(path))
            processor = _json_file(path / PROCESSOR) if task == "classify" else None
            # a folder's weights are what the user gave (model.pretrained is about timm and Hub names)
            return _from_transformers(str(path), str(path), config, True, kwargs, processor)
        return _from_file(path, arch, kwargs)
    if path.suffix == ".safetensors" or "/" in spec or spec.startswith("."):
        raise ModelSourceError(f"file not found: {spec}")
    return _from_timm(spec, pretrained, kwargs)


def open_checkpoint(spec: str | os.PathLike, top_k: int | None = None, capacity_factor: float | None = None,
                    disable_experts: str | None = None, label: Label = argument) -> Checkpoint:
    """A moe-cli checkpoint (a folder, a ``.safetensors`` file, or ``hf-hub:org/name``: a repository written by
    `moe push`, read through the local cache offline), or any dense source `moe upcycle` reads (a timm name, a timm
    or transformers folder or Hub repository: the baseline), with optional inference-time routing overrides
    (``disable_experts`` as 'layer:expert,...'; errors name them through ``label``)."""
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        ckpt = load_source(spec)  # a moe-cli repository loads as the checkpoint it is; others as dense sources
    elif is_moe_checkpoint(spec) or not Path(spec).exists() and ("/" in spec or spec.startswith(".") or
                                                              Path(spec).suffix == ".safetensors") \
            or Path(spec).is_file() and Path(spec).suffix != ".safetensors":
        ckpt = load_checkpoint(spec)  # (and the one-line errors for a missing or foreign file)
    elif Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
        ckpt = load_checkpoint(spec)  # a run folder, or a folder without a checkpoint: its one-line error
    else:
        ckpt = load_source(spec)
    apply_overrides(ckpt.model, top_k, capacity_factor, disable_experts, label)
    return ckpt


def load(path: str | os.PathLike, top_k: int | None = None, capacity_factor: float | None = None,
         disable_experts: str | None = None) -> nn.Module:
    """Load a moe-cli checkpoint (folder, ``.safetensors`` file or ``hf-hub:org/name``) as a ready model in eval
    mode, optionally with inference-time routing overrides (``disable_experts`` as 'layer:expert,...')."""
    return open_checkpoint(path, top_k, capacity_factor, disable_experts).model
