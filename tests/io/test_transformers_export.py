"""`moe export --format transformers`: an upcycled Llama / Mistral becomes a MixtralForCausalLM folder, a Qwen2 with
its gated shared expert a Qwen2MoeForCausalLM, a Qwen3 a Qwen3MoeForCausalLM; transformers' own
AutoModelForCausalLM loads each (no moe-cli code, no trust_remote_code) and gives moe-cli's logits — and, copy
upcycled, the dense model's. What a target cannot express is one line naming it, with nothing written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_line, seed_hub_cache
from tolerance import assert_close_scaled

transformers = pytest.importorskip("transformers")

from moe_cli.io.checkpoint import load_checkpoint, save  # noqa: E402
from moe_cli.io.sources import load_source  # noqa: E402
from moe_cli.models.surgery import upcycle  # noqa: E402

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}
CONFIGS = {"llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
           "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
           "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
           "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
           "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)}
CASES = [("llama", {"experts": 4, "k": 2}, "MixtralForCausalLM"),
         ("mistral", {"experts": 4, "k": 2}, "MixtralForCausalLM"),
         ("qwen2", {"experts": 4, "k": 2, "shared_experts": 1, "shared_gate": True}, "Qwen2MoeForCausalLM"),
         ("qwen2-no-shared", {"experts": 4, "k": 2}, "Qwen2MoeForCausalLM"),
         ("qwen3", {"experts": 4, "k": 2}, "Qwen3MoeForCausalLM")]
IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def dense_folder(tmp_path, family):
    family = family.split("-")[0]  # qwen2-no-shared: a qwen2
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    lm.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return lm


def upcycled(tmp_path, family, fields, noise=0.0):
    src = load_source(str(tmp_path / "dense"))
    upcycle(src.model, seed=0, noise_std=noise, **fields)
    return save(src, tmp_path / "moe").parent


@pytest.mark.parametrize("family,fields,target", CASES, ids=[c[0] for c in CASES])
def test_native_export_loads_in_transformers_and_gives_moe_clis_logits(cli, tmp_path, family, fields, target):
    dense_folder(tmp_path, family)
    ckpt = upcycled(tmp_path, family, fields, noise=0.01)  # noisy copies: the experts differ, routing matters
    r = cli("export", str(ckpt), "--format", "transformers", "--out", str(tmp_path / "native"))
    assert r.exit_code == 0, r.output
    assert "verify: max |moe-cli - transformers" in r.output and target in r.output
    native = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "native"), dtype=torch.float32).eval()
    assert type(native).__name__ == target
    assert (tmp_path / "native" / "tokenizer_config.json").is_file()  # tokenizer files come along
    with torch.no_grad():
        want = load_checkpoint(ckpt).model(IDS)
        assert_close_scaled(native(input_ids=IDS, use_cache=False).logits, want, torch.float32, ulps=256)


def test_the_shared_expert_qwen2_moe_export_reproduces_the_dense_model(cli, tmp_path):
    dense = dense_folder(tmp_path, "qwen2")
    ckpt = upcycled(tmp_path, "qwen2", {"experts": 4, "k": 2, "shared_experts": 1, "shared_gate": True})
    assert cli("export", str(ckpt), "--format", "transformers", "--out", str(tmp_path / "native")).exit_code == 0
    native = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "native"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_scaled(native(input_ids=IDS, use_cache=False).logits, dense(input_ids=IDS).logits, torch.float32,
                            ulps=256)


@pytest.mark.parametrize("family,fields,needle", [
    ("llama", {"experts": 4, "k": 4, "init": "split"}, "split experts (combine: sum)"),
    ("llama", {"experts": 4, "k": 2, "capacity_factor": 1.0}, "capacity limits"),
    ("llama", {"experts": 4, "k": 2, "shared_experts": 1}, "MixtralForCausalLM cannot express shared experts"),
    ("llama", {"experts": 4, "k": 2, "gate": "sigmoid_topk"}, "gate sigmoid_topk"),
    ("llama", {"experts": 4, "k": 2, "layers": "0"}, "dense layers between MoE layers"),
    ("qwen2", {"experts": 4, "k": 2, "shared_experts": 1}, "a shared expert without its sigmoid gate"),
    ("qwen3", {"experts": 4, "k": 2, "balance": "aux_free"}, "aux-loss-free selection biases"),
    ("gpt2", {"experts": 4, "k": 2}, "a `gpt2` model has no native transformers MoE class"),
])
def test_what_a_target_cannot_express_is_refused(cli, tmp_path, family, fields, needle):
    dense_folder(tmp_path, family)
    ckpt = upcycled(tmp_path, family, fields)
    one_line(cli("export", str(ckpt), "--format", "transformers", "--out", str(tmp_path / "native")), needle)
    assert not (tmp_path / "native").exists()


def test_merged_back_to_dense_it_exports_as_its_own_class_and_timm_models_are_refused(cli, tmp_path):
    dense = dense_folder(tmp_path, "llama")
    ckpt = upcycled(tmp_path, "llama", {"experts": 4, "k": 2})
    r = cli("merge", str(ckpt), "--experts", "1", "--calib", "lm-synthetic", "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0 and "--format transformers" in r.output, r.output
    r = cli("export", str(tmp_path / "merged"), "--format", "transformers", "--out", str(tmp_path / "n"))
    assert r.exit_code == 0, r.output
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "n"), dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():  # copies merged back: the dense model again
        assert_close_scaled(back(input_ids=IDS).logits, dense(input_ids=IDS).logits, torch.float32, ulps=256)
    assert cli("upcycle", "vit_tiny_patch16_224", "--no-pretrained", "-m", "depth=1", "-m", "img_size=32", "--out",
               str(tmp_path / "vit")).exit_code == 0
    one_line(cli("export", str(tmp_path / "vit"), "--format", "transformers", "--out", str(tmp_path / "v")),
             "--format transformers writes transformers causal LMs")
    assert not (tmp_path / "v").exists()


NATIVE = {
    "mixtral": lambda: transformers.MixtralConfig(**{**SMALL, "intermediate_size": 48}, num_local_experts=4,
                                                   num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, moe_intermediate_size=24, num_experts=4,
                                                     num_experts_per_tok=2, shared_expert_intermediate_size=96,
                                                     norm_topk_prob=False, qkv_bias=True),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, moe_intermediate_size=24, num_experts=4,
                                                     num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
}


@pytest.mark.parametrize("kind", list(NATIVE))
def test_a_native_moe_folder_reads_back_as_a_moe_cli_moe_and_exports_again(cli, tmp_path, kind):
    """Mixtral / Qwen2-MoE (its gated shared expert of 4 x H units: 4 shared experts) / Qwen3-MoE folders load as
    moe-cli MoE models with the same logits; eval, prune and export run on them."""
    torch.manual_seed(0)
    native = transformers.AutoModelForCausalLM.from_config(NATIVE[kind]()).eval()
    for p in native.parameters():  # transformers leaves a from_config model's fused experts uninitialised
        if not torch.isfinite(p).all() or p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.05)
    native.save_pretrained(tmp_path / "native")
    src = load_source(str(tmp_path / "native"))
    assert src.moe is not None and src.moe.experts == 4 and src.moe.k == 2
    assert src.moe.shared_experts == (4 if kind == "qwen2_moe" else 0)
    with torch.no_grad():
        assert_close_scaled(src.model(IDS), native(input_ids=IDS, use_cache=False).logits, torch.float32, ulps=256)
    ckpt = save(src, tmp_path / "moe").parent
    assert cli("eval", str(ckpt), "--metric", "ce,routing", "--data", "lm-synthetic").exit_code == 0
    r = cli("prune", str(ckpt), "--keep", "3", "--calib", "lm-synthetic", "--out", str(tmp_path / "p"))
    assert r.exit_code == 0, r.output
    r = cli("export", str(ckpt), "--format", "transformers", "--out", str(tmp_path / "again"))
    assert r.exit_code == 0, r.output
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), dtype=torch.float32).eval()
    assert type(again).__name__ == type(native).__name__
    with torch.no_grad():
        assert_close_scaled(again(input_ids=IDS, use_cache=False).logits, native(input_ids=IDS, use_cache=False).logits,
                            torch.float32, ulps=256)


@pytest.mark.long
def test_the_export_has_a_transformers_card_and_pushes_as_it_is(cli, tmp_path):
    from huggingface_hub import ModelCard

    dense_folder(tmp_path, "qwen2")
    seed_hub_cache(tmp_path / "hub", "org/tiny-qwen2", tmp_path / "dense")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MOE_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "-m", "moe_cli", "upcycle", "hf-hub:org/tiny-qwen2", "--experts", "4", "--k",
                        "2", "--out", str(tmp_path / "moe")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert cli("export", str(tmp_path / "moe"), "--format", "transformers", "--out", str(tmp_path / "native")
               ).exit_code == 0
    card = ModelCard.load(tmp_path / "native" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "org/tiny-qwen2" and "mixture-of-experts" in card.data.tags
    assert "moe upcycle hf-hub:org/tiny-qwen2 --experts 4" in card.text and "Qwen2MoeForCausalLM" in card.text
    r = cli("push", str(tmp_path / "native"), "me/tiny-qwen2-moe", "--dry-run", str(tmp_path / "dry"))
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "dry").iterdir()} == {p.name for p in (tmp_path / "native").iterdir()}
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dry")).config.model_type == "qwen2_moe"
    assert "from_pretrained('me/tiny-qwen2-moe')" in (tmp_path / "dry" / "README.md").read_text()
