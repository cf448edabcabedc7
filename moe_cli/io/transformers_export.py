"""`moe export --format transformers`: an upcycled transformers causal LM as the native transformers MoE class of its
family — a folder that ``AutoModelForCausalLM.from_pretrained`` loads with no moe-cli code and no
``trust_remote_code``, checked to give moe-cli's logits before it is published.

| source family | target class | what the target cannot express (refused) |
|---|---|---|
| llama, mistral | MixtralForCausalLM | shared experts, gates other than topk, normalize false |
| qwen2 | Qwen2MoeForCausalLM | shared experts without their sigmoid gate (S shared experts become one of S x H) |
| qwen3 | Qwen3MoeForCausalLM | shared experts |

For every target: split experts (`combine: sum`), capacity limits, top-p, expert choice, soft and sigmoid gates,
aux-loss-free biases, switched-off experts, expert biases, dense layers between MoE layers and per-layer expert
counts or sizes are refused in one line naming the setting.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from moe_cli.errors import ConfigError, MoeError
from moe_cli.io.card import native_card
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.causal_lm import CausalLM
from moe_cli.models.hf import config_dict, transformers_module
from moe_cli.models.probe import probe_batch
from moe_cli.moe.layer import MoEMlp, moe_layers

TARGETS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
           "qwen3": "Qwen3MoeForCausalLM"}
TOLERANCE = 1e-4  # max |moe-cli - transformers| logits, relative to max(1, max |logits|)
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
          "tokenizer.model", "generation_config.json", "chat_template.jinja")


class ExportMismatch(MoeError):
    """The exported folder does not compute moe-cli's logits (exit 1: a failed check)."""

    exit_code = 1


def _refuse(setting: str, target: str) -> ConfigError:
    return ConfigError(f"{target} cannot express {setting}; export with --format moe-cli (the default) instead")


def _check(model: CausalLM, layers: list[tuple[str, MoEMlp]], target: str) -> MoEMlp:
    blocks = model.lm.model.layers
    if len(layers) != len(blocks):
        raise _refuse(f"dense layers between MoE layers ({len(layers)} of {len(blocks)} blocks are MoE; upcycle "
                      "with --layers all)", target)
    first = layers[0][1]
    for name, layer in layers:
        cfg = layer.cfg
        if layer.num_experts != first.num_experts or layer.experts.dims != first.experts.dims:
            raise _refuse(f"per-layer expert counts or sizes (`{name}`)", target)
        checks = [(cfg.gate != "topk", f"gate {cfg.gate} (only topk routing)"),
                  (cfg.combine != "weighted", "split experts (combine: sum)"),
                  (cfg.capacity_factor is not None or cfg.eval_capacity_factor is not None, "capacity limits"),
                  (cfg.balance != "aux", "aux-loss-free selection biases (balance: aux_free)"),
                  (bool(cfg.disabled), "switched-off experts"),
                  (layer.experts.b1 is not None or layer.experts.b2 is not None, "expert biases"),
                  (not layer.experts.glu, "experts without a gate projection")]
        if target == "MixtralForCausalLM":
            checks += [(not cfg.normalize, "normalize false (Mixtral renormalises the top-k weights)"),
                       (cfg.shared_experts > 0, "shared experts")]
        elif target == "Qwen3MoeForCausalLM":
            checks += [(cfg.shared_experts > 0, "shared experts")]
        else:
            checks += [(cfg.shared_experts > 0 and not cfg.shared_gate, "a shared expert without its sigmoid gate")]
        for bad, what in checks:
            if bad:
                raise _refuse(what, target)
    return first


def _config(model: CausalLM, layer: MoEMlp, target: str):
    tf = transformers_module()
    dense = {k: v for k, v in config_dict(model.lm).items() if k != "model_type"}  # the target's class says it
    cls = getattr(tf, target)
    moe = {"num_experts_per_tok": layer.k}
    hidden = layer.experts.dims[0]
    if target == "MixtralForCausalLM":
        moe.update(num_local_experts=layer.num_experts, intermediate_size=hidden, sliding_window=None)
    else:
        moe.update(num_experts=layer.num_experts, moe_intermediate_size=hidden, norm_topk_prob=layer.cfg.normalize,
                   decoder_sparse_step=1, mlp_only_layers=[])
        if target == "Qwen2MoeForCausalLM":  # S shared experts of H units: one shared expert of S x H
            moe.update(shared_expert_intermediate_size=layer.cfg.shared_experts * layer.shared.dims[0]
                       if layer.shared is not None else 0, qkv_bias=True)
    return cls, cls.config_class.from_dict({**dense, **moe, "architectures": [target]})


def _state_dict(model: CausalLM, layers: list[tuple[str, MoEMlp]]) -> dict[str, torch.Tensor]:
    own = {k.removeprefix("lm."): v for k, v in model.state_dict().items()}
    out = {k: v for k, v in own.items() if ".mlp." not in k}
    for name, layer in layers:
        base = name.removeprefix("lm.")
        ex = layer.experts
        out[f"{base}.gate.weight"] = layer.router.weight.detach()
        out[f"{base}.experts.gate_up_proj"] = torch.cat([ex.wg, ex.w1], dim=1).detach()
        out[f"{base}.experts.down_proj"] = ex.w2.detach()
        if layer.shared is not None:  # S experts of H hidden units, concatenated: one of S x H
            sh = layer.shared
            out[f"{base}.shared_expert.gate_proj.weight"] = sh.wg.detach().flatten(0, 1)
            out[f"{base}.shared_expert.up_proj.weight"] = sh.w1.detach().flatten(0, 1)
            out[f"{base}.shared_expert.down_proj.weight"] = torch.cat(list(sh.w2.detach()), dim=1)
            out[f"{base}.shared_expert_gate.weight"] = layer.shared_gate.weight.detach()
    return out


@torch.no_grad()
def export_transformers(ckpt: Checkpoint, out: Path, source_folder: Path | None = None,
                        max_shard_size: str | None = None) -> tuple[Path, str, float]:
    """Write ``ckpt`` (an upcycled transformers causal LM) to the folder ``out`` as its family's transformers MoE
    class (sharded above ``max_shard_size``), tokenizer and generation files copied from ``source_folder`` (the
    dense source, when it is a folder);
    the written folder is loaded back with ``AutoModelForCausalLM`` and must reproduce moe-cli's logits. Returns
    (folder, class name, max |difference|)."""
    model = ckpt.model
    if not isinstance(model, CausalLM):
        raise ConfigError(f"--format transformers writes transformers causal LMs; {ckpt.source or 'this checkpoint'} "
                          f"is a {ckpt.architecture['name']} model (export it with --format moe-cli)")
    family = model.lm.config.model_type
    layers = moe_layers(model)
    if not layers:  # dense (a source, or an MoE merged back to one expert): its own class, as it is
        native, target = model.lm, model.class_name
    else:
        if family not in TARGETS:
            raise ConfigError(f"a `{family}` model has no native transformers MoE class; export with --format "
                              f"moe-cli (native targets: {', '.join(sorted(set(TARGETS.values())))})")
        target = TARGETS[family]
        first = _check(model, layers, target)
        cls, config = _config(model, first, target)
        with warnings.catch_warnings():  # a Qwen2-MoE without a shared expert has a 0-unit one
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            native = cls(config).eval()
        state = _state_dict(model, layers)
        if getattr(config, "shared_expert_intermediate_size", None) == 0:  # Qwen2-MoE without a shared expert:
            state |= {k: torch.zeros_like(v) for k, v in native.state_dict().items()  # its 0-unit one adds 0
                      if ".shared_expert" in k and k not in state}
        try:
            native.load_state_dict(state, strict=True)
        except RuntimeError as e:  # e.g. attention biases the target's attention does not have
            raise _refuse(f"this model's weights ({str(e).splitlines()[0][:160]})", target) from None
        if config.tie_word_embeddings:
            native.tie_weights()
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        native.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        (tmp / "README.md").write_text(native_card(ckpt, out.name, target))  # `moe push DIR` uploads it as is
        for name in COPIED if source_folder is not None else ():
            if (source_folder / name).is_file() and not (tmp / name).is_file():
                shutil.copyfile(source_folder / name, tmp / name)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            back = transformers_module().AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        ids = probe_batch(model.eval())
        want, got = model(ids), back(input_ids=ids, use_cache=False).logits
        diff, scale = (got - want).abs().max().item(), want.abs().max().item()
        if diff > TOLERANCE * max(1.0, scale):
            raise ExportMismatch(f"the exported {target} does not reproduce moe-cli's logits: max |difference| = "
                                 f"{diff:.3e}; nothing was written")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, target, diff
