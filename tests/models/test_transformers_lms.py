"""Hugging Face transformers causal LMs in: tiny Llama, Mistral, Qwen2, Qwen3 and GPT-2 models built with
transformers and saved in its own layout (a folder, and the Hub cache offline) load as moe-cli sources whose logits
are transformers' own; upcycled (copy, shared experts + gate, split at k = E) they compute what the dense model
did, `moe upcycle` proves it, and the MoE checkpoint loads back to the same logits with tied embeddings tied."""

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
from moe_cli.models.causal_lm import CausalLM  # noqa: E402
from moe_cli.models.surgery import find_ffns, upcycled_copy  # noqa: E402
from moe_cli.moe.layer import moe_layers  # noqa: E402

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0),
}
UPCYCLINGS = {"copy": {"experts": 4, "k": 2}, "shared+gate": {"experts": 4, "k": 2, "shared_experts": 1,
                                                               "shared_gate": True},
              "split k=E": {"experts": 4, "k": 4, "init": "split"}}


def tiny_lm(family: str, folder):
    """A randomly initialised tiny model of ``family``, saved as transformers saves it; its own logits on ids."""
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    lm.save_pretrained(folder)
    return lm


def ids(batch=2, length=12):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_logits_are_transformers_and_upcycling_keeps_them(tmp_path, family):
    lm = tiny_lm(family, tmp_path / "dense")
    with torch.no_grad():
        want = lm(input_ids=ids()).logits
    src = load_source(str(tmp_path / "dense"))
    assert isinstance(src.model, CausalLM) and src.moe is None
    assert src.architecture["name"] == f"transformers:{type(lm).__name__}"
    with torch.no_grad():
        assert_close_scaled(src.model(ids()), want, torch.float32)  # transformers' own model, read back
    assert len(find_ffns(src.model)) == 2
    for name, fields in UPCYCLINGS.items():
        sparse, layout = upcycled_copy(src.model, **fields)
        assert len(moe_layers(sparse)) == 2, name
        with torch.no_grad():
            assert_close_scaled(sparse(ids()), want, torch.float32)
    # the MoE checkpoint is self-describing: it loads back as the same model
    sparse, _ = upcycled_copy(src.model, **UPCYCLINGS["shared+gate"])
    src.model = sparse
    back = load_checkpoint(save(src, tmp_path / "moe"))
    with torch.no_grad():
        assert_close_scaled(back.model(ids()), sparse(ids()), torch.float32)
    tied = lm.config.tie_word_embeddings
    head, embed = back.model.lm.get_output_embeddings().weight, back.model.lm.get_input_embeddings().weight
    assert (head is embed) == tied, family


@pytest.mark.long
def test_moe_upcycle_of_a_transformers_folder_and_a_hub_repo_proves_equivalence(tmp_path):
    tiny_lm("qwen2", tmp_path / "dense")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MOE_DEVICE": "cpu"}
    seed_hub_cache(tmp_path / "hub", "org/tiny-qwen2", tmp_path / "dense")
    for source in (str(tmp_path / "dense"), "hf-hub:org/tiny-qwen2"):
        out = tmp_path / source.replace(":", "_").replace("/", "_")
        r = subprocess.run([sys.executable, "-m", "moe_cli", "upcycle", source, "--experts", "4", "--k", "2",
                            "--shared-experts", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert "verify: max |dense - moe|" in r.stdout and " ok" in r.stdout and not r.stderr.strip(), r.stderr
        assert load_checkpoint(out).moe.shared_experts == 1


def test_a_transformers_model_moe_cli_does_not_read_is_one_line(tmp_path, cli):
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32)
                                 ).save_pretrained(tmp_path / "bert")
    one_line(cli("upcycle", str(tmp_path / "bert"), "--out", str(tmp_path / "o")),
             "is a transformers `bert` model (BertForMaskedLM); moe-cli reads the causal LMs llama, mistral, qwen2, "
             "qwen3, gpt2, the MoE LMs mixtral, qwen2_moe, qwen3_moe and the vision models vit, deit, dinov2, clip")
    assert not (tmp_path / "o").exists()


def test_without_transformers_the_extra_is_named(tmp_path, cli, monkeypatch):
    tiny_lm("llama", tmp_path / "dense")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` does when it is absent
    one_line(cli("upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "o")),
             "need the optional `transformers` package: pip install -e '.[hf]'")
