"""Hugging Face transformers causal LMs as moe-cli models: the Llama, Mistral, Qwen2 and Qwen3 families (a
gate/up/down SwiGLU MLP per block) and GPT-2 (a GELU MLP of Conv1D layers), built by their own transformers class
and wrapped so that ``model(input_ids)`` returns the logits tensor.

A checkpoint names its class (``transformers:LlamaForCausalLM``) and holds the model's config
(:mod:`moe_cli.models.hf`). The upcycled model is the transformers model itself with its MLPs replaced by
:class:`~moe_cli.moe.layer.MoEMlp` (attention, norms and embeddings untouched; tied embeddings stay tied).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe_cli.errors import ModelSourceError
from moe_cli.models.hf import PREFIX, build_class, config_dict, load_pretrained, transformers_module

# model_type -> the causal-LM class moe-cli builds for it
CAUSAL_LMS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# native transformers MoE model_type -> the dense family moe-cli rebuilds it as (its MLPs become MoE layers)
NATIVE_MOE = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
NATIVE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}

def supported() -> str:
    return ", ".join(CAUSAL_LMS)


def lm_class(config: dict, where: str):
    """The transformers class moe-cli builds for ``config``, or one line naming what it found and what it reads."""
    model_type = config.get("model_type")
    model_type = NATIVE_MOE.get(model_type, model_type)
    if model_type not in CAUSAL_LMS:
        found = ", ".join(config.get("architectures") or []) or "no architecture"
        raise ModelSourceError(f"{where} is a transformers `{model_type}` model ({found}); moe-cli reads the "
                               f"transformers causal LMs {supported()}, the MoE classes {', '.join(NATIVE_MOE)} (and "
                               "timm models, timm and GENIE folders, moe-cli checkpoints)")
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
    return CausalLM(build_class(class_name, config))


def from_pretrained(folder: str | Path, config: dict, pretrained: bool = True) -> CausalLM:
    """The causal LM in a transformers folder (``config.json`` + weights, as ``save_pretrained`` writes them), in
    fp32; ``pretrained`` False: its architecture with fresh weights. A native MoE (Mixtral, Qwen2-MoE, Qwen3-MoE)
    comes back as its dense family with moe-cli MoE layers (:func:`from_native_moe`)."""
    cls = lm_class(config, str(folder))
    if config.get("model_type") in NATIVE_MOE:
        native_cls = getattr(transformers_module(), NATIVE_CLASSES[config["model_type"]])
        return from_native_moe(_load(folder, native_cls, pretrained, config))
    if not pretrained:
        return build(PREFIX + cls.__name__, config)
    return CausalLM(_load(folder, cls, True, config))


def _load(folder, cls, pretrained: bool, config: dict) -> nn.Module:
    return load_pretrained(cls, folder) if pretrained else build_class(cls.__name__, config)


def _experts(native: nn.Module) -> tuple[int, int, int, int]:
    """(experts, k, routed hidden, shared hidden) of a native MoE model's config."""
    c = native.config
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    hidden = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return experts, c.num_experts_per_tok, hidden, getattr(c, "shared_expert_intermediate_size", 0) or 0


@torch.no_grad()
def from_native_moe(native: nn.Module) -> CausalLM:
    """A transformers Mixtral / Qwen2-MoE / Qwen3-MoE model as its dense family (Mistral, Qwen2, Qwen3) whose MLPs
    are moe-cli MoE layers holding the same weights: top-k softmax routing, renormalised when the model does
    (Mixtral always, Qwen ``norm_topk_prob``); Qwen2-MoE's gated shared expert of S x H hidden units becomes S
    shared experts of H (a partition of its units: their sum is the same FFN)."""
    from moe_cli.models.surgery import apply_moe
    from moe_cli.moe.config import MoELayout

    c = native.config
    family = NATIVE_MOE[c.model_type]
    experts, k, hidden, shared_hidden = _experts(native)
    blocks = native.model.layers
    sparse = [type(b.mlp).__name__.endswith("SparseMoeBlock") for b in blocks]
    if not all(sparse):
        raise ModelSourceError(f"this {type(native).__name__} has dense MLP layers between its MoE layers "
                               "(mlp_only_layers / decoder_sparse_step); moe-cli reads models whose every layer is MoE")
    if shared_hidden % hidden:
        raise ModelSourceError(f"the shared expert's {shared_hidden} hidden units are not a multiple of the "
                               f"experts' {hidden}")
    shared = shared_hidden // hidden
    dense_cfg = {**config_dict(native), "model_type": family, "intermediate_size": hidden}
    model = build(PREFIX + CAUSAL_LMS[family], dense_cfg)
    names = tuple(f"lm.model.layers.{i}.mlp" for i in range(len(blocks)))
    normalize = bool(getattr(c, "norm_topk_prob", True))
    apply_moe(model, MoELayout(experts=experts, k=k, normalize=normalize, shared_experts=shared,
                               shared_gate=shared > 0, layers=names), shapes_only=True)
    src = native.state_dict()
    own = model.state_dict()
    for key in own:
        if ".mlp." not in key and key.removeprefix("lm.") in src:
            own[key].copy_(src[key.removeprefix("lm.")])
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        base = f"model.layers.{i}.mlp"
        layer.router.weight.copy_(src[f"{base}.gate.weight"])
        gate, up = src[f"{base}.experts.gate_up_proj"].chunk(2, dim=1)
        layer.experts.wg.copy_(gate)
        layer.experts.w1.copy_(up)
        layer.experts.w2.copy_(src[f"{base}.experts.down_proj"])
        if shared:
            sh = layer.shared
            sh.wg.copy_(src[f"{base}.shared_expert.gate_proj.weight"].view(shared, hidden, -1))
            sh.w1.copy_(src[f"{base}.shared_expert.up_proj.weight"].view(shared, hidden, -1))
            sh.w2.copy_(src[f"{base}.shared_expert.down_proj.weight"].view(-1, shared, hidden).transpose(0, 1))
            layer.shared_gate.weight.copy_(src[f"{base}.shared_expert_gate.weight"])
    return model.eval()
