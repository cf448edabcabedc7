"""The transformers models moe-cli reads, in one place: which ``model_type`` is which kind (causal LM, native
MoE LM, vision classifier), the one-line refusal for the rest, and building them from a repository or from a
checkpoint's ``transformers:ClassName`` metadata."""

from __future__ import annotations

from torch import nn

from moe_cli.errors import ModelSourceError
from moe_cli.models import causal_lm, hf_vision
from moe_cli.models.hf import PREFIX, is_transformers_config  # noqa: F401 — re-exported for the io layer

TASKS = {"causal-lm": "causal LMs", "classify": "vision models"}


def supported() -> str:
    return (f"the causal LMs {causal_lm.supported()}, the MoE LMs {', '.join(causal_lm.NATIVE_MOE)} and the vision "
            f"models {', '.join([*hf_vision.VISION, *hf_vision.TOWERS])}")


def task_of(config: dict, where: str) -> str:
    """The task a transformers ``config.json`` is for (``causal-lm`` or ``classify``), or one line naming what it
    found and what moe-cli reads."""
    model_type = config.get("model_type")
    if hf_vision.family(model_type):
        return "classify"
    if causal_lm.NATIVE_MOE.get(model_type, model_type) in causal_lm.CAUSAL_LMS:
        return "causal-lm"
    found = ", ".join(config.get("architectures") or []) or "no architecture"
    raise ModelSourceError(f"{where} is a transformers `{model_type}` model ({found}); moe-cli reads {supported()} "
                           "(and timm models, timm and GENIE folders, moe-cli checkpoints)")


def build(name: str, config: dict) -> nn.Module:
    """A listed transformers class from checkpoint metadata (``transformers:ClassName`` and its config), without
    weights."""
    class_name = name.removeprefix(PREFIX)
    if class_name in causal_lm.CAUSAL_LMS.values():
        return causal_lm.build(name, config)
    if class_name in hf_vision.VISION.values():
        return hf_vision.build(name, config)
    raise ModelSourceError(f"`{name}` is not a transformers class moe-cli builds "
                           f"({', '.join([*causal_lm.CAUSAL_LMS.values(), *hf_vision.VISION.values()])})")


def from_pretrained(where: str, config: dict, pretrained: bool = True, kwargs: dict | None = None,
                    processor: dict | None = None) -> tuple[nn.Module, str]:
    """(model, task) for a transformers folder or Hub repository. ``kwargs`` (a recipe's ``model.kwargs``):
    ``num_classes`` for a vision model (a fresh classifier of that size when it differs), nothing for an LM."""
    task = task_of(config, where)
    kwargs = dict(kwargs or {})
    allowed = ("num_classes",) if task == "classify" else ()
    if extra := [k for k in kwargs if k not in allowed]:
        raise ModelSourceError(f"`model.kwargs.{extra[0]}` does not apply to the transformers model {where}; its "
                               f"config.json says what it is" + (" (only num_classes may be set)" if allowed else ""))
    if task == "causal-lm":
        return causal_lm.from_pretrained(where, config, pretrained), task
    num_classes = kwargs.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ModelSourceError(f"`model.kwargs.num_classes` must be a positive integer, got {num_classes!r}")
    return hf_vision.from_pretrained(where, config, pretrained, num_classes, processor), task


def architecture(model: nn.Module) -> dict:
    """The checkpoint metadata that rebuilds a transformers ``model`` (its class and config)."""
    return (causal_lm.architecture if isinstance(model, causal_lm.CausalLM) else hf_vision.architecture)(model)
