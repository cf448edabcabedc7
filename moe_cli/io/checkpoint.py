"""moe-cli checkpoints: ``model.safetensors`` whose ``__metadata__`` holds everything needed to rebuild the model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from moe_cli.errors import CheckpointError, ConfigError, ModelSourceError
from moe_cli.models.overrides import apply_overrides
from moe_cli.models.probe import probe_batch
from moe_cli.models.surgery import (
    TOLERANCE,
    UpcycleMismatch,
    Verification,
    apply_moe,
    capture_inputs,
    init_routers,
    moe_layers,
    upcycle,
    upcycle_targets,
    verify_upcycle,
)
from moe_cli.moe.config import MoELayout, UpcycleCfg
from moe_cli.runtime import atomic_write

FORMAT = "moe-cli/1"
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Checkpoint:
    """A model together with what is needed to rebuild it: timm architecture, source, task and task settings.

    The MoE layout (``moe``: the layers' shared config and their module names) is read from the model's MoE
    layers, which own their config, so it never drifts from what the model does."""

    def __init__(self, model: nn.Module, architecture: dict, moe: MoELayout | None = None, source: str = "",
                 task: str = "classify", extra: dict | None = None, task_config: dict | None = None):
        self.model = model
        self.architecture = architecture  # {"name": timm model name, "kwargs": {...}}
        self.source = source
        self.task = task
        self.extra = dict(extra or {})
        self.task_config = dict(task_config or {})  # the task's eval settings (masked-tokens: decoder, masks)
        self.initial_load: dict | None = None  # expert load on calibration data after a data-driven router init
        if moe is not None and (self.moe is None or self.moe.layers != moe.layers):
            raise ValueError(f"the MoE layout names layers {list(moe.layers)}, the model has "
                             f"{list(self.moe.layers) if self.moe else []}")

    @property
    def moe(self) -> MoELayout | None:
        layers = moe_layers(self.model)
        if not layers:
            return None
        first = layers[0][1]
        return MoELayout(**first.cfg.routing().__dict__, layers=tuple(n for n, _ in layers), init=first.init_method)

    def upcycle(self, cfg: UpcycleCfg | None = None, *, seed: int = 0, verify: bool = False,
                tolerance: float = TOLERANCE, calibration=None, **fields) -> Verification | None:
        """Turn this dense model into an MoE in place (see surgery.upcycle), remembering the dense size.

        ``calibration``: batches of model inputs for a data-driven ``router_init`` (the routers are fitted to the inputs
        each converted FFN sees in the dense model; the initial expert load lands in ``self.initial_load``).
        With ``verify``, prove on a probe batch that the MoE computes what the dense model did; where it must
        (copy without noise, split with k = E), a mismatch raises :class:`UpcycleMismatch` and leaves this
        checkpoint dense; otherwise the difference is only reported."""
        cfg = (cfg or UpcycleCfg(**fields)).validate()
        if self.moe is not None:
            raise ConfigError(f"{self.source or 'the model'} is already an MoE ({self.moe.experts} experts)")
        tokens = None
        if cfg.router_init != "random":
            if calibration is None:
                raise ConfigError(f"router_init {cfg.router_init} needs calibration batches (calibration=)")
            tokens = capture_inputs(self.model, upcycle_targets(self.model, cfg), calibration)
        dense = copy.deepcopy(self.model).eval() if verify else self.model
        dense_params = sum(p.numel() for p in self.model.parameters())
        probe = probe_batch(dense, seed=seed) if verify else None
        sparse, layout = upcycle(self.model, cfg, seed=seed)
        self.initial_load = init_routers(sparse, tokens, cfg.router_init, seed) if tokens is not None else None
        result = None
        if verify:
            result = verify_upcycle(dense, sparse, probe, layout, tolerance)
            exact = cfg.noise_std == 0 and (cfg.init == "copy" or (cfg.init == "split" and cfg.k == cfg.experts
                                                                   and cfg.gate == "topk"))
            if not result.ok and exact:
                self.model = dense
                raise UpcycleMismatch(f"the upcycled model does not reproduce the dense model: max |dense - moe| = "
                                      f"{result.max_diff:.3e} > {result.limit:.1e}; nothing was written")
        self.model = sparse
        self.extra = {**self.extra, "dense_params": dense_params}
        return result

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
        }


def weights_path(path: str | os.PathLike) -> Path:
    """``dir/`` -> ``dir/model.safetensors``; a ``.safetensors`` file stays as it is; another file is an error."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p
    if p.is_file():
        raise CheckpointError(f"{p} is not a .safetensors file: moe-cli reads safetensors checkpoints (a folder "
                              "with model.safetensors, or a .safetensors file)")
    return p / WEIGHTS_NAME


def save(ckpt: Checkpoint, path: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write ``ckpt`` to ``path`` (a folder, or a ``.safetensors`` file), optionally casting floats to ``dtype``."""
    target = weights_path(path)
    cast = DTYPES[dtype] if dtype else None
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = {}
    for name, t in ckpt.model.state_dict().items():
        t = t.detach()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        tensors[name] = t.contiguous().cpu()
    meta = ckpt.metadata() | ({"dtype": dtype} if dtype else {})
    atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
    return target


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; a missing or corrupt file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def is_moe_checkpoint(path: str | os.PathLike) -> bool:
    p = weights_path(path)
    return p.is_file() and read_metadata(p).get("format") == FORMAT


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` strictly, turning key or shape mismatches into one-line CheckpointErrors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing `{missing[0]}`" if missing else f"unexpected `{unexpected[0]}`"
        raise CheckpointError(f"{path} does not match the architecture: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, t in state.items():
        if t.shape != own[k].shape:
            raise CheckpointError(f"{path} does not match the architecture: `{k}` has shape {tuple(t.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


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
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ModelSourceError(f"cannot build timm model `{name}` with {kwargs}: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the exact model saved by :func:`save` from the file alone."""
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
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{target}: corrupt moe-cli metadata ({e})") from None
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs", {}), dict)):
        raise CheckpointError(f"{target}: metadata `architecture` must be {{\"name\": str, \"kwargs\": {{...}}}}")
    model = create_timm(arch["name"], architecture_kwargs(arch.get("kwargs", {}), str(target)))
    if moe_dict is not None:
        def label(name: str) -> str:
            return f"{target}: metadata `moe{'.' + name if name else ''}`"

        apply_moe(model, MoELayout.from_dict(moe_dict, label), shapes_only=True)
    load_state(model, read_tensors(target), target)
    if meta.get("dtype") in DTYPES:
        model.to(DTYPES[meta["dtype"]])
    return Checkpoint(model.eval(), arch, None, meta.get("source", ""), meta.get("task", "classify"), extra,
                      task_config)


def load(path: str | os.PathLike, top_k: int | None = None, capacity_factor: float | None = None,
         disable_experts: str | None = None) -> nn.Module:
    """Load a moe-cli checkpoint (folder or ``.safetensors`` file) as a ready model in eval mode, optionally
    with inference-time routing overrides (``disable_experts`` as 'layer:expert,...')."""
    return apply_overrides(load_checkpoint(path).model, top_k, capacity_factor, disable_experts)
