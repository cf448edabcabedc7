"""The recipe's shared sections (model, data, optim, schedule, train, moe, densify) as typed, frozen dataclasses, and
the strict typed parsing of mappings into them (:func:`build`, ``--set a.b=value``, ``--model-arg``).

Components own their config: the MoE layer's settings are :class:`moe_cli.moe.config.MoEConfig`, the recipe
section ``model.upcycle`` is its :class:`~moe_cli.moe.config.UpcycleCfg` (the class the ``moe upcycle`` options
are made from), and each task's section is the ``Config`` of its module in :mod:`moe_cli.tasks`. The recipe as a
whole (its task section, loading, cross-section rules) is :mod:`moe_cli.recipe`. Every section checks its own rules
when it is made (:class:`moe_cli.checks.Checked`), in the words of the recipe: ```train.steps` in run.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import yaml

from moe_cli.checks import Checked, Label, check, finite, in_recipe, is_int, labelled, origin_of
from moe_cli.errors import ConfigError
from moe_cli.moe.config import Gate, MoEConfig, UpcycleCfg, enum_type
from moe_cli.runtime import Choice, Parallel, Precision, parse_size


@dataclass(frozen=True)
class ModelCfg(Checked):
    source: str = "vit_tiny_patch16_224"  # timm name, hf-hub:org/name, .safetensors, moe-cli checkpoint
    arch: str | None = None  # timm architecture of a plain .safetensors file
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    upcycle: UpcycleCfg | None = None  # set: turn the dense source into an MoE first


@dataclass(frozen=True)
class SyntheticTokensCfg(Checked):
    """Moving token patterns written to `data.root` when it holds no data yet (see moe_cli.data.tokens)."""

    train_sequences: int = 512  # clips written for data.train_split
    val_sequences: int = 128  # and for data.val_split
    frames: int = 4  # each clip: frames x height x width token ids
    height: int = 4
    width: int = 4
    vocab_size: int = 32  # ids in [0, vocab_size)
    seed: int = 0  # the validation split is drawn from seed + 1

    def validate(self, label: Label) -> SyntheticTokensCfg:
        for name in ("train_sequences", "val_sequences", "frames", "height", "width", "vocab_size"):
            check(getattr(self, name) >= 1, label(name), "an integer >= 1", getattr(self, name))
        return self


@dataclass(frozen=True)
class DataCfg(Checked):
    # digits (built in); tokens (root/<split>.json + memory-mapped array, for masked-tokens); or a timm dataset
    # name ("" = ImageFolder, hfds/NAME, ...)
    name: str = "digits"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    img_size: int | None = None  # default: the model's input size
    num_workers: int = 0
    augment: bool = False
    synthetic: SyntheticTokensCfg | None = None  # tokens only: generate the data into `root` if missing
    stride: int = 15  # genie: images between the frames of a clip (15: 2 Hz from the 30 Hz recordings)
    download: bool = False  # timm `torch/...` datasets (torch/cifar100, ...): download into `root` if missing
    data_dir: str | None = None  # hfds/imagefolder, hfds/parquet, ...: the folder of files to read
    data_files: dict | None = None  # or the files of each split: {train: a/*.parquet, validation: [b, c]}
    # preprocessing; null: the model's own (timm's data config of the source model, kept in its checkpoints)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None  # bilinear, bicubic, ... (image folders / timm datasets)
    crop_pct: float | None = None  # eval: resize to size / crop_pct, then centre-crop
    crop_mode: str | None = None  # center, squash, border
    # text (causal LMs): the tokenizer (a transformers folder or hf-hub:org/name; default: model.source when it is
    # one) and the tokens per training sequence
    tokenizer: str | None = None
    seq_len: int = 128

    def preprocessing(self) -> dict:
        """The preprocessing fields this recipe sets (the rest come from the model)."""
        return {k: getattr(self, k) for k in PREPROCESS_FIELDS if getattr(self, k) is not None}

    def validate(self, label: Label) -> DataCfg:
        check(self.num_workers >= 0, label("num_workers"), "an integer >= 0", self.num_workers)
        check(self.img_size is None or self.img_size >= 1, label("img_size"), "an integer >= 1 or null (the model's)",
              self.img_size)
        check(self.stride >= 1, label("stride"), "an integer >= 1", self.stride)
        for key in ("data_dir", "data_files"):
            check(getattr(self, key) is None or self.name.startswith("hfds/"), label(key),
                  "set only with `data.name: hfds/<builder>` (e.g. hfds/imagefolder, hfds/parquet)", getattr(self, key))
        check(self.data_files is None or self.data_dir is None, label("data_files"),
              "left out when `data.data_dir` is set (one or the other)", self.data_files)
        check(self.data_files is None or _split_files(self.data_files), label("data_files"),
            "a mapping of split names to a file (or glob) or a list of them, e.g. {train: a/*.parquet, validation: "
            "b.parquet}", self.data_files)
        check(is_int(self.seq_len) and self.seq_len >= 2, label("seq_len"), "an integer >= 2", self.seq_len)
        check_preprocessing(self.preprocessing(), label)
        return self


def _split_files(value) -> bool:
    """A mapping of split names to a path or a non-empty list of paths (globs allowed)."""
    def paths(v) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(f, str) for f in v))

    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and paths(v) for k, v in value.items())


PREPROCESS_FIELDS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


MIN_CROP_PCT = 0.05  # eval resizes to size / crop_pct: below this the resized image outgrows PIL and memory
MAX_NORMALISED = 1e4  # |(x - mean) / std| for pixels x in [0, 1]: beyond it fp32 activations overflow


def check_preprocessing(d: dict, label: Label) -> dict:
    """Image preprocessing (a recipe's `data` overrides, or a checkpoint's stored data config): mean / std three
    finite numbers (std > 0) that keep normalised pixels within +-MAX_NORMALISED, a known interpolation and crop
    mode, crop_pct in [MIN_CROP_PCT, 1]. Returns ``d``."""
    for key in ("mean", "std"):
        if key in d:
            v = d[key]
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(finite(x) for x in v) and \
                (key == "mean" or all(x > 0 for x in v))
            check(ok, label(key), "three finite numbers" + (" > 0" if key == "std" else ""), v)
    mean, std = d.get("mean", (0.5,) * 3), d.get("std", (0.5,) * 3)
    worst = max(max(abs(0 - m), abs(1 - m)) / s for m, s in zip(mean, std, strict=True))
    if worst > MAX_NORMALISED:
        names = [label(k) for k in ("mean", "std") if k in d]
        assumed = "".join(f", {k} taken as 0.5" for k in ("mean", "std") if k not in d)
        raise ConfigError(f"{' / '.join(names)}: normalised pixels (x - mean) / std reach {worst:.3g} (x in [0, 1]"
                          f"{assumed}), beyond +-{MAX_NORMALISED:g}, where the model's fp32 activations overflow; "
                          "mean and std are per-channel statistics of pixels in [0, 1] (e.g. 0.5 and 0.5)")
    if "interpolation" in d:
        check(d["interpolation"] in INTERPOLATIONS, label("interpolation"), f"one of {', '.join(INTERPOLATIONS)}",
              d["interpolation"])
    if "crop_mode" in d:
        check(d["crop_mode"] in CROP_MODES, label("crop_mode"), f"one of {', '.join(CROP_MODES)}", d["crop_mode"])
    if "crop_pct" in d:
        check(finite(d["crop_pct"]) and MIN_CROP_PCT <= d["crop_pct"] <= 1, label("crop_pct"),
              f"a number in [{MIN_CROP_PCT}, 1] (images are resized to size / crop_pct)", d["crop_pct"])
    return d


@dataclass(frozen=True)
class OptimCfg(Checked):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9

    def validate(self, label: Label) -> OptimCfg:
        check(finite(self.lr) and 0 < self.lr <= 100, label("lr"), "a number in (0, 100]", self.lr)
        check(finite(self.weight_decay) and self.weight_decay >= 0, label("weight_decay"), "a finite number >= 0",
              self.weight_decay)
        check(all(finite(b) and 0 <= b < 1 for b in self.betas), label("betas"), "two numbers in [0, 1)",
              list(self.betas))
        check(finite(self.momentum) and 0 <= self.momentum < 1, label("momentum"), "a number in [0, 1)",
              self.momentum)
        return self


@dataclass(frozen=True)
class ScheduleCfg(Checked):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self, label: Label) -> ScheduleCfg:
        check(self.warmup_steps >= 0, label("warmup_steps"), "an integer >= 0", self.warmup_steps)
        check(finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, label("min_lr_ratio"), "a number in [0, 1]",
              self.min_lr_ratio)
        return self


LOGGERS = ("tensorboard", "wandb")
Checkpointing = Choice.of("Checkpointing", **{
    "none": "keep every activation for the backward pass",
    "blocks": "recompute each transformer block in the backward pass (least memory)",
    "moe": "recompute only the MoE layers (their expert activations: most of an MoE block's memory)"})


@dataclass(frozen=True)
class TrainCfg(Checked):
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    grad_accum: int = 1
    clip: float | None = 1.0
    precision: Precision = Precision.fp32
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    ckpt_every: int = 0  # steps; 0 = only at the end
    log_every: int = 10
    label_smoothing: float = 0.0
    compile: bool = False  # torch.compile the model for training (dynamic token counts: no recompile per step)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for debugging)
    parallel: Parallel = Parallel.ddp  # under torchrun: ddp (whole model per rank) or fsdp (sharded, FSDP2)
    expert_parallel: int = 1  # ranks that split each MoE layer's experts between them (1: each holds all)
    keep_best: str | None = None  # a validation metric (accuracy, ce, ...): <output>/best/ holds the best model by it
    keep_last: int | None = None  # keep the last N periodic checkpoints as <output>/checkpoints/step-N/ (None: last/)
    log_to: tuple[str, ...] = ("tensorboard",)  # loggers besides metrics.jsonl: tensorboard, wandb (optional extra)
    activation_checkpointing: Checkpointing = Checkpointing("none")  # recompute activations in backward (memory)
    max_shard_size: str | None = "5GB"  # last/, final/, best/ above it: Hugging Face's sharded layout (null: never)
    reuse_host_memory: bool = True  # CPU runs: keep freed memory for the next step (faster, higher resident memory)

    def validate(self, label: Label) -> TrainCfg:
        check(self.steps is None or self.steps >= 1, label("steps"), "an integer >= 1", self.steps)
        check(self.epochs is None or finite(self.epochs) and self.epochs > 0, label("epochs"), "a finite number > 0",
              self.epochs)
        for name in ("batch_size", "grad_accum", "log_every"):
            check(getattr(self, name) >= 1, label(name), "an integer >= 1", getattr(self, name))
        check(is_int(self.expert_parallel) and self.expert_parallel >= 1, label("expert_parallel"),
              "an integer >= 1 (ranks per expert group)", self.expert_parallel)
        if self.precision == Precision.fp16 and (self.parallel == Parallel.fsdp or self.expert_parallel > 1):
            raise ConfigError(f"{label('precision')}: fp16 loss scaling is not supported with sharded training "
                              f"({label('parallel')} fsdp or {label('expert_parallel')} > 1); use bf16")
        for name in ("eval_every", "ckpt_every"):
            check(getattr(self, name) >= 0, label(name), "an integer >= 0 (0: only at the end)", getattr(self, name))
        check(self.clip is None or finite(self.clip) and self.clip > 0, label("clip"),
              "a finite number > 0 or null (no clipping)", self.clip)
        check(finite(self.label_smoothing) and 0 <= self.label_smoothing < 1, label("label_smoothing"),
              "a number in [0, 1)", self.label_smoothing)
        check(self.keep_last is None or is_int(self.keep_last) and self.keep_last >= 1, label("keep_last"),
              "an integer >= 1 or null (only last/)", self.keep_last)
        check(all(x in LOGGERS for x in self.log_to), label("log_to"), f"a list of {', '.join(LOGGERS)}",
              list(self.log_to))
        parse_size(self.max_shard_size, label("max_shard_size"))
        return self


BalanceScope = Choice.of("BalanceScope", **{
    "global": "f_i over the optimizer step's tokens so far, on all processes (one all-reduce per step and layer)",
    "micro_batch": "f_i over each forward's own tokens (per process, per micro-batch)"})


@dataclass(frozen=True)
class MoELossCfg(Checked):
    load_balance: float = 0.01
    z_loss: float = 0.001
    load_balance_scope: BalanceScope = BalanceScope("global")  # which tokens f_i of the load-balance loss counts

    def validate(self, label: Label) -> MoELossCfg:
        for name in ("load_balance", "z_loss"):
            check(finite(getattr(self, name)) and getattr(self, name) >= 0, label(name), "a finite number >= 0",
                  getattr(self, name))
        return self


def _check_stage(stage: Any, label: Label) -> None:
    check(stage.steps >= 1, label("steps"), "an integer >= 1", stage.steps)
    check(stage.lr is None or finite(stage.lr) and stage.lr > 0, label("lr"), "a finite number > 0 (or null: optim.lr)",
          stage.lr)


@dataclass(frozen=True)
class DenseStageCfg(Checked):
    """Stage 1: dense (softmax over all experts) MoE with the two inverse-CV losses."""

    steps: int = 300
    lr: float | None = None  # default: optim.lr
    token_cv: float = 0.01  # weight of the per-token CV' loss (toward one-hot gates)
    expert_cv: float = 0.01  # weight of the per-expert CV' loss (expert use varies across images)
    cv_eps: float = 0.01
    noise_std: float = 0.0  # eps in softmax(Wx + eps) during training

    def validate(self, label: Label) -> DenseStageCfg:
        _check_stage(self, label)
        for name in ("token_cv", "expert_cv", "noise_std"):
            check(finite(getattr(self, name)) and getattr(self, name) >= 0, label(name), "a finite number >= 0",
                  getattr(self, name))
        check(finite(self.cv_eps) and self.cv_eps > 0, label("cv_eps"), "a finite number > 0", self.cv_eps)
        return self


@dataclass(frozen=True)
class DistillStageCfg(Checked):
    """Stage 2: new sparse top-k gates trained alone to reproduce the dense gate (KL per token)."""

    steps: int = 200
    lr: float | None = 1e-2
    distill: float = 1.0
    task: float = 0.0  # optional task-loss weight
    noise_std: float = 0.0

    def validate(self, label: Label) -> DistillStageCfg:
        _check_stage(self, label)
        return self


@dataclass(frozen=True)
class FinetuneStageCfg(Checked):
    """Stage 3: everything unfrozen, sparse gate."""

    steps: int = 200
    lr: float | None = None

    def validate(self, label: Label) -> FinetuneStageCfg:
        _check_stage(self, label)
        return self


@dataclass(frozen=True)
class DensifyCfg(Checked):
    experts: int = UpcycleCfg.experts
    k: int = 1  # experts per token of the sparse gate
    layers: str = UpcycleCfg.layers
    stage1: DenseStageCfg = field(default_factory=DenseStageCfg)
    stage2: DistillStageCfg = field(default_factory=DistillStageCfg)
    stage3: FinetuneStageCfg = field(default_factory=FinetuneStageCfg)

    def validate(self, label: Label) -> DensifyCfg:
        check(is_int(self.experts) and self.experts >= 2, label("experts"), "an integer >= 2 (a mixture)",
              self.experts)
        with labelled(label):  # the two gates it makes, checked in this section's words
            self.upcycle()
            self.sparse_gate()
        return self

    def upcycle(self) -> UpcycleCfg:
        """Stage 0: the dense (soft-gated) MoE the source becomes; ``k`` is the sparse gate's, set in stage 2."""
        with labelled(self.words()):
            return UpcycleCfg(experts=self.experts, k=self.k, layers=self.layers, gate=Gate.soft)

    def sparse_gate(self) -> MoEConfig:
        """Stages 2-3: the sparse gate that replaces the dense one (top-k of the full softmax, as the method)."""
        with labelled(self.words()):
            return MoEConfig(experts=self.experts, k=self.k, gate=Gate.topk, normalize=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " | ".join(repr(e.value) for e in tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
        return f"list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is tuple:
        return f"list of {len(typing.get_args(tp))} numbers"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null", float: "number", int: "integer", bool: "true/false", str: "string",
            dict: "mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str, src: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        nested = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):
            return build(nested[0], value, where, src)  # report errors inside the section itself
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where, src)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif enum_type(tp) is tp:
        if isinstance(value, str) and value in {e.value for e in tp}:
            return tp(value)
    elif origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[str, ...]: a list of any length
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]", src) for i, v in enumerate(value))
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]", src) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, where, src)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"`{where}` in {origin_of(src, where)} must be {_type_name(tp)}, got {type(value).__name__} "
                      f"{value!r}")


def build(cls, data: dict, prefix: str, src: str, sections: dict[str, type] | None = None):
    """The dataclass ``cls`` from the mapping ``data``, every value typed and every rule checked, errors naming
    ```prefix.key` in src``. ``sections``: extra keys (a recipe's task sections) built as their own dataclasses
    and passed together as the ``sections`` argument."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "sections" or sections is None]
    kwargs: dict = {}
    extra: dict = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if sections is not None and key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"`{where}` in {origin_of(src, where)} must be a mapping, got {type(value).__name__} "
                              f"{value!r}")
            extra[key] = build(sections[key], value, where, src)
            continue
        if key not in names:
            known = names + sorted(sections or ())
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" — did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else \
                f" (known: {', '.join(known)})"
            raise ConfigError(f"unknown key `{where}` in {origin_of(src, where)}{hint}")
        kwargs[key] = _coerce(value, hints[key], where, src)
    if sections is not None:
        kwargs["sections"] = extra
    with labelled(in_recipe(prefix, src)):
        try:
            return cls(**kwargs)
        except TypeError as e:  # a dataclass refusing a combination the types allowed
            raise ConfigError(f"`{prefix or cls.__name__}` in {src}: {e}") from None


def parse_assignment(text: str, option: str, example: str = "KEY=VALUE") -> tuple[str, Any]:
    """'a.b=3e-4' -> ('a.b', 0.0003): the value parsed as YAML. The one parser of --set and --model-arg."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} expects KEY=VALUE like {example}, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{option} {key.strip()}: cannot parse value {raw!r}") from None


def parse_assignments(texts: list[str] | None, option: str) -> dict:
    """['depth=2', 'img_size=32'] -> {'depth': 2, 'img_size': 32}."""
    return dict(parse_assignment(t, option) for t in texts or [])


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` (value parsed as YAML) to a nested dict, returning a new dict."""
    key, value = parse_assignment(assignment, "--set", "optim.lr=3e-4")
    out = dict(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value
    return out


def section_from(cls, data: dict, where: str, src: str):
    """The config dataclass ``cls`` from the keys of ``data`` it knows (a checkpoint's task_config holds others),
    typed and checked as in a recipe: `where.field` in `src` names what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{where}` in {src} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return build(cls, {k: v for k, v in data.items() if k in names}, where, src)
