"""Configuration: the recipe's typed, frozen dataclasses, YAML loading with strict validation, `--set a.b=value`.

Components own their config: the MoE layer's settings are :class:`moe_cli.moe.config.MoEConfig`, and the
recipe section ``model.upcycle`` is its :class:`~moe_cli.moe.config.UpcycleCfg` (which FFNs, copy noise), the
same class the ``moe upcycle`` options build. Everything here is importable from every package above ``moe``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_cli.errors import ConfigError
from moe_cli.moe.config import Gate, MoEConfig, UpcycleCfg, enum_type
from moe_cli.runtime import Parallel, Precision


@dataclass(frozen=True)
class ModelCfg:
    source: str = "vit_tiny_patch16_224"  # timm name, hf-hub:org/name, .safetensors, moe-cli checkpoint
    arch: str | None = None  # timm architecture of a plain .safetensors file
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    upcycle: UpcycleCfg | None = None  # set: turn the dense source into an MoE first


@dataclass(frozen=True)
class SyntheticTokensCfg:
    """Moving token patterns written to `data.root` when it holds no data yet (see moe_cli.data.tokens)."""

    train_sequences: int = 512
    val_sequences: int = 128
    frames: int = 4
    height: int = 4
    width: int = 4
    vocab_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class DataCfg:
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
    # preprocessing; null: the model's own (timm's data config of the source model, kept in its checkpoints)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None  # bilinear, bicubic, ... (image folders / timm datasets)
    crop_pct: float | None = None  # eval: resize to size / crop_pct, then centre-crop
    crop_mode: str | None = None  # center, squash, border

    def preprocessing(self) -> dict:
        """The preprocessing fields this recipe sets (the rest come from the model)."""
        return {k: getattr(self, k) for k in PREPROCESS_FIELDS if getattr(self, k) is not None}

    def check(self, label: Callable[[str], str]) -> None:
        _check_field(self.num_workers >= 0, label("num_workers"), "an integer >= 0", self.num_workers)
        _check_field(self.img_size is None or self.img_size >= 1, label("img_size"),
                     "an integer >= 1 or null (the model's)", self.img_size)
        _check_field(self.stride >= 1, label("stride"), "an integer >= 1", self.stride)
        check_preprocessing(self.preprocessing(), label)


PREPROCESS_FIELDS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


def check_preprocessing(d: dict, label: Callable[[str], str]) -> dict:
    """Image preprocessing (a recipe's `data` overrides, or a checkpoint's stored data config): mean / std three
    finite numbers (std > 0), a known interpolation and crop mode, crop_pct in (0, 1]. Returns ``d``."""
    for key in ("mean", "std"):
        if key in d:
            v = d[key]
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(_finite(x) for x in v) and \
                (key == "mean" or all(x > 0 for x in v))
            _check_field(ok, label(key), "three finite numbers" + (" > 0" if key == "std" else ""), v)
    if "interpolation" in d:
        _check_field(d["interpolation"] in INTERPOLATIONS, label("interpolation"),
                     f"one of {', '.join(INTERPOLATIONS)}", d["interpolation"])
    if "crop_mode" in d:
        _check_field(d["crop_mode"] in CROP_MODES, label("crop_mode"), f"one of {', '.join(CROP_MODES)}",
                     d["crop_mode"])
    if "crop_pct" in d:
        _check_field(_finite(d["crop_pct"]) and 0 < d["crop_pct"] <= 1, label("crop_pct"), "a number in (0, 1]",
                     d["crop_pct"])
    return d


@dataclass(frozen=True)
class OptimCfg:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9


@dataclass(frozen=True)
class ScheduleCfg:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainCfg:
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


@dataclass(frozen=True)
class MoELossCfg:
    load_balance: float = 0.01
    z_loss: float = 0.001


@dataclass(frozen=True)
class DenseStageCfg:
    """Stage 1: dense (softmax over all experts) MoE with the two inverse-CV losses."""

    steps: int = 300
    lr: float | None = None  # default: optim.lr
    token_cv: float = 0.01  # weight of the per-token CV' loss (toward one-hot gates)
    expert_cv: float = 0.01  # weight of the per-expert CV' loss (expert use varies across images)
    cv_eps: float = 0.01
    noise_std: float = 0.0  # eps in softmax(Wx + eps) during training


@dataclass(frozen=True)
class DistillStageCfg:
    """Stage 2: new sparse top-k gates trained alone to reproduce the dense gate (KL per token)."""

    steps: int = 200
    lr: float | None = 1e-2
    distill: float = 1.0
    task: float = 0.0  # optional task-loss weight
    noise_std: float = 0.0


@dataclass(frozen=True)
class FinetuneStageCfg:
    """Stage 3: everything unfrozen, sparse gate."""

    steps: int = 200
    lr: float | None = None


@dataclass(frozen=True)
class DensifyCfg:
    experts: int = UpcycleCfg.experts
    k: int = 1  # experts per token of the sparse gate
    layers: str = UpcycleCfg.layers
    stage1: DenseStageCfg = field(default_factory=DenseStageCfg)
    stage2: DistillStageCfg = field(default_factory=DistillStageCfg)
    stage3: FinetuneStageCfg = field(default_factory=FinetuneStageCfg)

    def upcycle(self) -> UpcycleCfg:
        """Stage 0: the dense (soft-gated) MoE the source becomes; ``k`` is the sparse gate's, set in stage 2."""
        return UpcycleCfg(experts=self.experts, k=self.k, layers=self.layers, gate=Gate.soft)

    def sparse_gate(self) -> MoEConfig:
        """Stages 2-3: the sparse gate that replaces the dense one (top-k of the full softmax, as the method)."""
        return MoEConfig(experts=self.experts, k=self.k, gate=Gate.topk, normalize=False)


@dataclass(frozen=True)
class MAECfg:
    """Masked-autoencoder pretraining of the model (a timm ViT) as encoder."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # regress per-patch normalised pixels

    def check(self, label: Callable[[str], str]) -> None:
        _check_field(0 < self.mask_ratio < 1, label("mask_ratio"), "a number in (0, 1)", self.mask_ratio)
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            _check_field(getattr(self, name) >= 1, label(name), "an integer >= 1", getattr(self, name))
        _check_field(self.decoder_dim % self.decoder_heads == 0, label("decoder_dim"),
                     f"divisible by decoder_heads ({self.decoder_heads})", self.decoder_dim)


@dataclass(frozen=True)
class MaskedTokensCfg:
    """MaskGIT-style training: cosine mask schedule, cross-entropy on the masked tokens."""

    eval_mask_ratio: float | None = None  # eval masks: None = cosine-schedule ratios from a fixed seed
    predict_frames: int = 0  # eval: mask the last N frames entirely (future-frame prediction) instead
    decoder: str | None = None  # module:function, tokens (B,F,H,W) -> images (B,F,C,h,w) in [-1, 1], for LPIPS
    sample_steps: int = 8  # iterative decoding steps when filling masked tokens for LPIPS

    def check(self, label: Callable[[str], str]) -> None:
        _check_field(self.eval_mask_ratio is None or 0 < self.eval_mask_ratio <= 1, label("eval_mask_ratio"),
                     "a number in (0, 1] or null", self.eval_mask_ratio)
        _check_field(self.predict_frames >= 0, label("predict_frames"), "an integer >= 0", self.predict_frames)
        _check_field(self.sample_steps >= 1, label("sample_steps"), "an integer >= 1", self.sample_steps)


@dataclass(frozen=True)
class GenieTaskCfg:
    """The GENIE objective and evaluation protocol (1X world-model challenge)."""

    maskgit_steps: int = 2  # eval: MaskGIT steps per generated frame
    decoder: str | None = None  # module:function, tokens (B,F,H,W) -> images (B,F,C,h,w) in [-1, 1], for LPIPS
    eval_max_batches: int | None = None  # eval: stop after this many validation batches (None: all)
    seed: int = 42  # eval: the re-masking order of MaskGIT decoding

    def check(self, label: Callable[[str], str]) -> None:
        _check_field(self.maskgit_steps >= 1, label("maskgit_steps"), "an integer >= 1", self.maskgit_steps)
        _check_field(self.eval_max_batches is None or self.eval_max_batches >= 1, label("eval_max_batches"),
                     "an integer >= 1 or null (all batches)", self.eval_max_batches)


TASKS = ("classify", "mae", "masked-tokens", "genie")


@dataclass(frozen=True)
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    moe: MoELossCfg = field(default_factory=MoELossCfg)
    densify: DensifyCfg | None = None  # only for `moe densify-to-sparse`
    task: Literal["classify", "mae", "masked-tokens", "genie"] = "classify"
    mae: MAECfg = field(default_factory=MAECfg)  # task: mae
    masked_tokens: MaskedTokensCfg = field(default_factory=MaskedTokensCfg)  # task: masked-tokens
    genie: GenieTaskCfg = field(default_factory=GenieTaskCfg)  # task: genie
    output: str = "runs/run"
    # a follow-up run (e.g. MAE pretraining, then classification): sections given here replace this recipe's,
    # the rest are inherited, and `model.source` defaults to this run's `<output>/final`
    then: dict | None = None

    def to_dict(self) -> dict:
        """Plain data (choices as their strings): what recipe.yaml and the resume check hold."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " | ".join(repr(e.value) for e in tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
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
            return _build(nested[0], value, where, src)  # report errors inside the section itself
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
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]", src) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where, src)
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
    raise ConfigError(f"`{where}` in {src} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" — did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else \
                f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key `{where}` in {src}{hint}")
        kwargs[key] = _coerce(value, hints[key], where, src)
    return cls(**kwargs)


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


def recipe_from_dict(data: dict, src: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    for assignment in overrides or []:
        _build(Recipe, apply_override({}, assignment), "", f"`--set {assignment}`")  # its own errors name --set
        data = apply_override(data, assignment)
    recipe = _build(Recipe, data, "", src)
    validate(recipe, src)
    return recipe


def recipe_chain(recipe: Recipe, src: str = "recipe") -> list[Recipe]:
    """The recipe followed by its `then:` runs, each a full validated recipe."""
    chain = [recipe]
    while chain[-1].then is not None:
        parent = chain[-1]
        then = parent.then
        if "output" not in then or then["output"] == parent.output:
            raise ConfigError(f"`then.output` in {src} must name a folder of its own (this run writes {parent.output})")
        if "densify" in then or parent.densify is not None:
            raise ConfigError(f"`then` in {src}: densify-to-sparse recipes cannot be chained")
        data = {k: v for k, v in parent.to_dict().items() if k != "then"}
        data.update(then)
        model = dict(then.get("model") or {})
        model.setdefault("source", str(Path(parent.output) / "final"))
        data["model"] = model
        chain.append(recipe_from_dict(data, f"{src} (then #{len(chain)})"))
        if len(chain) > 8:
            raise ConfigError(f"{src}: more than 8 chained `then` runs")
    return chain


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; ``overrides`` are `--set a.b=value` strings applied first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not a text file (a YAML recipe was expected)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must be a mapping of sections (model, data, optim, ...)")
    return recipe_from_dict(data, path.name, overrides)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field: str, expected: str, value, src: str) -> None:
    _check_field(ok, f"`{field}` in {src}", expected, value)


def _check_field(ok: bool, where: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"{where} must be {expected}, got {value!r}")


def section_from(cls, data: dict, where: str, src: str):
    """The config dataclass ``cls`` from the keys of ``data`` it knows (a checkpoint's task_config holds others),
    typed and checked as in a recipe: `where.field` in `src` names what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{where}` in {src} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = _build(cls, {k: v for k, v in data.items() if k in names}, where, src)
    if hasattr(cfg, "check"):
        cfg.check(lambda field: f"`{where}.{field}` in {src}")
    return cfg


def validate(r: Recipe, src: str) -> None:
    t = r.train
    if r.densify is not None:
        d = r.densify
        for cfg in (d.upcycle(), d.sparse_gate()):
            cfg.validate(lambda name: f"`densify.{name}` in {src}")
        _check(d.experts >= 2, "densify.experts", "an integer >= 2 (a mixture)", d.experts, src)
        for i, stage in enumerate((d.stage1, d.stage2, d.stage3), 1):
            _check(stage.steps >= 1, f"densify.stage{i}.steps", "an integer >= 1", stage.steps, src)
            _check(stage.lr is None or _finite(stage.lr) and stage.lr > 0, f"densify.stage{i}.lr",
                   "a finite number > 0 (or null: optim.lr)", stage.lr, src)
        for name in ("token_cv", "expert_cv", "noise_std"):
            _check(_finite(getattr(d.stage1, name)) and getattr(d.stage1, name) >= 0, f"densify.stage1.{name}",
                   "a finite number >= 0", getattr(d.stage1, name), src)
        _check(_finite(d.stage1.cv_eps) and d.stage1.cv_eps > 0, "densify.stage1.cv_eps", "a finite number > 0",
               d.stage1.cv_eps, src)
    elif (t.steps is None) == (t.epochs is None):
        raise ConfigError(f"{src}: set exactly one of `train.steps` and `train.epochs`")
    for name in ("batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise ConfigError(f"`train.{name}` in {src} must be >= 1, got {getattr(t, name)}")
    if (t.steps is not None and t.steps < 1) or (t.epochs is not None and t.epochs <= 0):
        raise ConfigError(f"{src}: `train.steps` / `train.epochs` must be positive")
    o = r.optim
    _check(_finite(o.lr) and 0 < o.lr <= 100, "optim.lr", "a number in (0, 100]", o.lr, src)
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "a finite number >= 0",
           o.weight_decay, src)
    _check(all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas), src)
    _check(_finite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", "a number in [0, 1)", o.momentum, src)
    sc = r.schedule
    _check(sc.warmup_steps >= 0, "schedule.warmup_steps", "an integer >= 0", sc.warmup_steps, src)
    _check(_finite(sc.min_lr_ratio) and 0 <= sc.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a number in [0, 1]",
           sc.min_lr_ratio, src)
    _check(t.log_every >= 1, "train.log_every", "an integer >= 1", t.log_every, src)
    _check(isinstance(t.expert_parallel, int) and not isinstance(t.expert_parallel, bool) and t.expert_parallel >= 1,
           "train.expert_parallel", "an integer >= 1 (ranks per expert group)", t.expert_parallel, src)
    if t.precision == Precision.fp16 and (t.parallel == Parallel.fsdp or t.expert_parallel > 1):
        raise ConfigError(f"`train.precision` in {src}: fp16 loss scaling is not supported with sharded training "
                          "(train.parallel: fsdp or train.expert_parallel > 1); use bf16")
    for name in ("eval_every", "ckpt_every"):
        _check(getattr(t, name) >= 0, f"train.{name}", "an integer >= 0 (0: only at the end)", getattr(t, name), src)
    _check(t.clip is None or _finite(t.clip) and t.clip > 0, "train.clip", "a finite number > 0 or null (no clipping)",
           t.clip, src)
    _check(_finite(t.label_smoothing) and 0 <= t.label_smoothing < 1, "train.label_smoothing", "a number in [0, 1)",
           t.label_smoothing, src)
    _check(t.epochs is None or _finite(t.epochs), "train.epochs", "a finite number", t.epochs, src)
    for name in ("data", "mae", "masked_tokens", "genie"):
        getattr(r, name).check(lambda field, name=name: f"`{name}.{field}` in {src}")
    for name in ("load_balance", "z_loss"):
        value = getattr(r.moe, name)
        _check(_finite(value) and value >= 0, f"moe.{name}", "a finite number >= 0", value, src)
    if r.densify is not None and r.task != "classify":
        raise ConfigError(f"`densify` in {src} trains classifiers; `task` must be classify, got {r.task!r}")
    if (r.data.name == "genie") != (r.task == "genie"):
        raise ConfigError(f"{src}: task `genie` trains on `data.name: genie` (1X token folders) and only it does "
                          f"(task {r.task!r}, data {r.data.name!r})")
    if (r.data.name == "tokens") != (r.task == "masked-tokens"):
        raise ConfigError(f"{src}: task `masked-tokens` trains on `data.name: tokens` and only it does "
                          f"(task {r.task!r}, data {r.data.name!r})")
    if r.data.name == "tokens" and not r.data.root:
        raise ConfigError(f"`data.root` in {src} is required for token data (a folder with <split>.json)")
    if r.model.upcycle is not None:
        r.model.upcycle.validate(lambda name: f"`model.upcycle.{name}` in {src}")
