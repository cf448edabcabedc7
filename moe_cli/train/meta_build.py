"""Models bigger than one host under ``train.parallel: fsdp``: build the model's structure without its weights
(parameters on the meta device), upcycle that structure, shard it, and only then give each rank its own shards —
read from the source's safetensors files slice by slice (``safe_open(...).get_slice``), the experts of each MoE
layer made from the dense FFN by the upcycling rule, one layer at a time. No process ever holds the whole model.

Used when the source is a moe-cli checkpoint or a transformers causal-LM folder (weights in safetensors), also
with expert parallelism (a rank reads and fills only its experts' rows); otherwise (random initial weights, a
data-driven router init) the model is built whole on each process as before. The upcycling proof runs layer by
layer: each upcycled layer must compute what its dense FFN did on random tokens (as ``moe upcycle`` proves the
whole model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from torch import nn

from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import INDEX_NAME, WEIGHTS_NAME, Checkpoint, is_moe_checkpoint, load_checkpoint
from moe_cli.io.checkpoint import shard_files as checkpoint_files
from moe_cli.models.upcycle import TOLERANCE, UpcycleMismatch, must_match
from moe_cli.moe.config import MoELayout
from moe_cli.moe.layer import expert_shards, moe_layers
from moe_cli.moe.upcycling import from_dense


@contextlib.contextmanager
def params_on_meta():
    """Parameters are created on the meta device (no memory), buffers as usual (rotary tables and the like are
    computed at construction and are not in the weights files)."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Weights:
    """The tensors of a set of safetensors files by name, read a slice at a time (``prefix``: the model's names
    have it, the files' do not — a transformers folder under moe-cli's ``lm.`` wrapper)."""

    def __init__(self, files: list[Path], prefix: str = ""):
        self.prefix = prefix
        self.where: dict[str, Path] = {}
        for f in files:
            with safetensors.safe_open(str(f), framework="pt") as h:
                self.where |= {k: f for k in h.keys()}  # noqa: SIM118 — not a dict

    def __contains__(self, name: str) -> bool:
        return name.removeprefix(self.prefix) in self.where

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        key = name.removeprefix(self.prefix)
        with safetensors.safe_open(str(self.where[key]), framework="pt") as h:
            part = h.get_slice(key)
            return part[start:stop] if part.get_shape() else h.get_tensor(key)


@dataclass
class MetaBuild:
    """A model skeleton (parameters on meta) and how to fill it once sharded."""

    ckpt: Checkpoint
    weights: Weights
    upcycle: dict = field(default_factory=dict)  # layer name -> (dense FFN skeleton, layer index)
    layout: MoELayout | None = None
    seed: int = 0
    noise_std: float = 0.0
    drop_ratio: float = 0.5
    split: str = "cluster"
    verify: bool = False
    checked: list = field(default_factory=list)  # (layer, max |dense - moe|) of the layer-wise proof

    def materialize(self, model: nn.Module, device: torch.device) -> None:
        """Give this rank's shards (and every buffer) their values: dense tensors sliced from the files, each MoE
        layer built on CPU from its dense FFN by the upcycling rule and sliced."""
        buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
        model.to_empty(device=device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:  # the MoE layers' own come with them below
                    b.copy_(buffers[name])
            own = dict(model.named_parameters())
            experts = expert_shards(model)  # expert parallelism: this rank's rows of the whole layer's
            done = set()
            gen = torch.Generator().manual_seed(self.seed)  # routers drawn as apply_moe draws them: layer by layer
            for name, (dense, index) in sorted(self.upcycle.items(), key=lambda kv: kv[1][1]):
                layer = self._upcycled(name, dense, index, gen)
                state = layer.state_dict()
                for key, value in state.items():
                    full = f"{name}.{key}"
                    if full in own:
                        if full in experts:
                            value = value[experts[full].start:experts[full].stop]
                        _fill(own[full], lambda a, b, v=value: v[a:b])
                        done.add(full)
                    else:  # a buffer of the layer (aux-free biases)
                        model.get_buffer(full).copy_(value)
            for full, param in own.items():
                if full in done:
                    continue
                if full not in self.weights:
                    raise ConfigError(f"`{full}` is not in the source's weights ({self.ckpt.source})")
                rows = lambda a, b, n=full: self.weights.rows(n, a, b)  # noqa: E731
                if full in experts:
                    rows = _offset(rows, experts[full])
                _fill(param, rows)
            for full, b in model.named_buffers():
                if full in self.weights and not any(full.startswith(n + ".") for n in self.upcycle):
                    b.copy_(self.weights.rows(full))

    def _upcycled(self, name: str, dense: nn.Module, index: int, gen: torch.Generator) -> nn.Module:
        ffn = copy.deepcopy(dense).to_empty(device="cpu")
        with torch.no_grad():
            for key, p in ffn.named_parameters():
                p.copy_(self.weights.rows(f"{name}.{key}"))
        layer = from_dense(ffn, config=self.layout.layer(index), noise_std=self.noise_std, generator=gen,
                           init=self.layout.init, drop_ratio=self.drop_ratio, split=self.split)
        if self.verify:
            x = torch.randn(2, 8, _in_features(ffn), generator=torch.Generator().manual_seed(index))
            with torch.no_grad():
                want, got = ffn.eval()(x), layer.eval()(x)
            diff, scale = (got - want).abs().max().item(), want.abs().max().item()
            self.checked.append((name, diff))
            if diff > TOLERANCE * max(1.0, scale):
                raise UpcycleMismatch(f"the upcycled `{name}` does not reproduce its dense FFN: max |dense - moe| = "
                                      f"{diff:.3e}; nothing was written")
        return layer.train()


def _in_features(ffn: nn.Module) -> int:
    from moe_cli.moe.ffn import read_ffn

    return read_ffn(ffn).in_features


def _fill(param: torch.Tensor, rows) -> None:
    """Copy this rank's rows (FSDP2 shards dim 0) of the full tensor ``rows(start, stop)`` into ``param``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        param.copy_(rows(None, None))
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if local.numel() == 0 or shape[0] == 0:
        return
    start = offset[0] if param.dim() else None
    value = rows(start, start + shape[0]) if param.dim() else rows(None, None)
    local[: shape[0]].copy_(value.to(local.dtype))


def _offset(rows, experts: range):
    """``rows(a, b)`` of the whole expert tensor, as rows of this rank's experts ``experts`` alone."""
    def local(a, b):
        return rows(experts.start + (a or 0), experts.start + (b if b is not None else len(experts)))

    return local


def _hub_folder(source: str) -> Path | None:
    """The local snapshot folder of ``hf-hub:org/name`` with its safetensors weights (every shard) and config.json
    (fetched, or from the cache when offline); None when it has no safetensors weights there to read in slices."""
    from huggingface_hub import hf_hub_download

    from moe_cli.errors import MoeError
    from moe_cli.io.hub import download, quiet_hub

    hub_id = source.split(":", 1)[1]
    try:
        weights = download(hub_id)
        with quiet_hub():
            hf_hub_download(hub_id, "config.json")
    except (MoeError, OSError, ValueError):  # no such files (a .bin-only repository, ...): the whole-model build
        return None  # says what is wrong, if anything
    return weights.parent


def _source_files(source: str, pretrained: bool) -> tuple[list[Path], str, dict] | None:
    """(safetensors files, name prefix, transformers config) of a source whose weights can be read in slices: a
    moe-cli checkpoint or a transformers causal-LM folder, local or ``hf-hub:`` (with ``pretrained``: without,
    a Hub source is its architecture alone); None for any other."""
    if source.startswith("hf-hub:"):
        folder = _hub_folder(source) if pretrained else None
        if folder is None:
            return None
        source = str(folder)
    p = Path(source)
    if is_moe_checkpoint(p):
        weights = p if p.suffix == ".safetensors" or p.name == INDEX_NAME else \
            (p / WEIGHTS_NAME if (p / WEIGHTS_NAME).is_file() else p / INDEX_NAME)
        return checkpoint_files(weights), "", {}
    config = p / "config.json"
    if p.is_dir() and config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        from moe_cli.models import causal_lm

        if not isinstance(cfg, dict) or cfg.get("model_type") not in causal_lm.CAUSAL_LMS:
            return None
        if (p / WEIGHTS_NAME).is_file():
            return [p / WEIGHTS_NAME], "lm.", cfg
        if (p / INDEX_NAME).is_file():
            return checkpoint_files(p / INDEX_NAME), "lm.", cfg
    return None


def plan_meta_build(recipe, task, resume_from: Path | None = None) -> MetaBuild | None:
    """The skeleton of the recipe's model (or of the checkpoint ``resume_from``) and how to fill it, when it can be
    built that way (see the module); None when it cannot."""
    from moe_cli.models import causal_lm
    from moe_cli.models.surgery import apply_moe, upcycle_targets

    m = recipe.model
    up = m.upcycle if resume_from is None else None
    if resume_from is not None:
        m = dataclasses.replace(m, source=str(resume_from), upcycle=None)
    if (up is not None and up.router_init != "random") or m.kwargs:
        return None
    found = _source_files(m.source, m.pretrained)
    if found is None:
        return None
    files, prefix, hf_config = found
    with params_on_meta():
        if prefix:  # a transformers causal LM: its class from its config, no weights read
            lm = causal_lm.build(causal_lm.PREFIX + causal_lm.CAUSAL_LMS[hf_config["model_type"]], hf_config)
            ckpt = Checkpoint(lm, causal_lm.architecture(lm), source=m.source, task="causal-lm")
        else:
            ckpt = load_checkpoint(files[0].parent if m.source.startswith("hf-hub:") else m.source, weights=False)
    if m.source.startswith("hf-hub:") and ckpt.moe is None:  # as the whole-model build records a Hub source
        ckpt.extra.setdefault("base_model", m.source.split(":", 1)[1])
    ckpt = task.prepare(ckpt, m, recipe.data)
    build = MetaBuild(ckpt, Weights(files, prefix), seed=recipe.train.seed)
    if up is not None:
        if ckpt.moe is not None:
            raise ConfigError(f"`model.upcycle` is set but {m.source} is already an MoE checkpoint")
        dense_params = sum(p.numel() for p in ckpt.model.parameters())
        names = upcycle_targets(ckpt.model, up)
        build.upcycle = {n: (copy.deepcopy(ckpt.model.get_submodule(n)), i) for i, n in enumerate(names)}
        from moe_cli.checks import labelled

        with labelled(up.words()):
            build.layout = MoELayout(**up.layer_config().values(), layers=names, init=up.init)
        build.noise_std, build.drop_ratio, build.split = up.noise_std, up.drop_ratio, up.split
        build.verify = must_match(up)
        apply_moe(ckpt.model, build.layout, shapes_only=True)
        ckpt.init = up.init
        from moe_cli.train.build import record_upcycle

        record_upcycle(ckpt, up, dense_params)
    ckpt.task = recipe.task
    assert all(p.device.type == "meta" for p in ckpt.model.parameters())
    assert moe_layers(ckpt.model) or up is None
    return build
