"""Hugging Face transformers causal LMs as moe-cli models: the Llama, Mistral, Qwen2 and Qwen3 families (a
gate/up/down SwiGLU MLP per block) and GPT-2 (a GELU MLP of Conv1D layers), built by their own transformers class
and wrapped so that ``model(input_ids)`` returns the logits tensor.

The optional `transformers` package (``pip install -e '.[hf]'``) is imported only here and only when such a model is
used: timm work never needs it. A checkpoint names its class (``transformers:LlamaForCausalLM``) and holds the
model's config; only the classes listed here are built from it, never code a repository names (no
``trust_remote_code``). The upcycled model is the transformers model itself with its MLPs replaced by
:class:`~moe_cli.moe.layer.MoEMlp` (attention, norms and embeddings untouched; tied embeddings stay tied).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe_cli.errors import ModelSourceError

HF_EXTRA = "pip install -e '.[hf]' (in the moe-cli checkout), or pip install transformers tokenizers"
PREFIX = "transformers:"
# model_type -> the causal-LM class moe-cli builds for it
CAUSAL_LMS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# config keys that say where code or files come from, not what the model is: never passed on from metadata
NOT_ARCHITECTURE = ("auto_map", "architectures", "transformers_version", "name_or_path")


def transformers_module():
    """The `transformers` package, or one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(f"Hugging Face transformers models need the optional `transformers` package: "
                               f"{HF_EXTRA}") from None
    transformers.utils.logging.set_verbosity_error()  # its load reports and progress bars are not ours to print
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_transformers_config(config) -> bool:
    """A transformers ``config.json`` (it names its ``model_type``)."""
    return isinstance(config, dict) and isinstance(config.get("model_type"), str) and "architecture" not in config


def supported() -> str:
    return ", ".join(CAUSAL_LMS)


def lm_class(config: dict, where: str):
    """The transformers class moe-cli builds for ``config``, or one line naming what it found and what it reads."""
    model_type = config.get("model_type")
    if model_type not in CAUSAL_LMS:
        found = ", ".join(config.get("architectures") or []) or "no architecture"
        raise ModelSourceError(f"{where} is a transformers `{model_type}` model ({found}); moe-cli reads the "
                               f"transformers causal LMs {supported()} (and timm models, timm and GENIE folders, "
                               "moe-cli checkpoints)")
    return getattr(transformers_module(), CAUSAL_LMS[model_type])


class CausalLM(nn.Module):
    """A transformers causal LM as moe-cli runs it: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    @property
    def class_name(self) -> str:
        return type(self.lm).__name__

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None, length: int = 16) -> torch.Tensor:
        """Random token ids (the upcycling check's probe batch)."""
        device = next(self.parameters()).device
        return torch.randint(0, self.vocab_size, (batch, length), generator=generator).to(device)


def config_dict(lm: nn.Module) -> dict:
    """The model's config as plain JSON, without the keys that point at code or files."""
    return {k: v for k, v in lm.config.to_dict().items() if not k.startswith("_") and k not in NOT_ARCHITECTURE}


def architecture(model: CausalLM) -> dict:
    """The checkpoint metadata that rebuilds ``model`` (its class and config)."""
    return {"name": PREFIX + model.class_name, "kwargs": config_dict(model.lm)}


def build(name: str, config: dict) -> CausalLM:
    """A listed transformers causal LM from checkpoint metadata (``transformers:ClassName`` and its config),
    without weights."""
    class_name = name.removeprefix(PREFIX)
    if class_name not in CAUSAL_LMS.values():
        raise ModelSourceError(f"`{name}` is not a transformers class moe-cli builds "
                               f"({', '.join(CAUSAL_LMS.values())})")
    cls = getattr(transformers_module(), class_name)
    try:
        cfg = cls.config_class.from_dict({k: v for k, v in config.items() if k not in NOT_ARCHITECTURE})
        return CausalLM(cls(cfg).eval())
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelSourceError(f"cannot build {class_name} from its config: {str(e).splitlines()[0]}") from None


def from_pretrained(folder: str | Path, config: dict, pretrained: bool = True) -> CausalLM:
    """The causal LM in a transformers folder (``config.json`` + weights, as ``save_pretrained`` writes them), in
    fp32; ``pretrained`` False: its architecture with fresh weights."""
    cls = lm_class(config, str(folder))
    if not pretrained:
        return build(PREFIX + cls.__name__, config)
    try:
        lm = cls.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelSourceError(f"cannot load the transformers model in {folder}: {str(e).splitlines()[0]}") from None
    return CausalLM(lm.eval())
