"""`data.name: text` for causal LMs: .txt / .jsonl documents tokenized with the model's own tokenizer (a BPE
tokenizer trained here with `tokenizers`, saved with the model as transformers saves it), concatenated and cut into
fixed-length sequences; every bad input is one line."""

import json

import pytest
import torch
import yaml
from conftest import one_line

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from moe_cli.data.lm import text_dataset  # noqa: E402
from moe_cli.recipe import load_recipe  # noqa: E402
from moe_cli.train.loop import train  # noqa: E402

WORDS = "the cat sat on the mat and the dog sat on the log while a bird sang in the tree".split()


def corpus(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(n)]


@pytest.fixture
def model_folder(tmp_path):
    """A tiny Llama and a BPE tokenizer trained on the spot, in one transformers folder."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(corpus(200, 0), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    folder = tmp_path / "tiny-llama"
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "text"
    (root / "train").mkdir(parents=True)
    for i in range(3):
        (root / "train" / f"part{i}.txt").write_text("\n".join(corpus(40, i + 1)))
    (root / "validation.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus(40, 9)))
    return root


def test_documents_become_fixed_length_sequences_of_the_models_ids(model_folder, texts):
    ds = text_dataset(texts, "validation", str(model_folder), 16, 80)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_folder))
    first = json.loads((texts / "validation.jsonl").read_text().splitlines()[0])["text"]
    want = tok(first, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ds[0][0].shape == (16,) and ds[0][0][:len(want)].tolist() == want[:16]
    assert len(ds) > 10 and int(max(ds[i][0].max() for i in range(len(ds)))) < len(tok)


def test_a_recipe_trains_on_text_with_the_sources_tokenizer(model_folder, texts, tmp_path):
    data = {"model": {"source": str(model_folder)}, "task": "causal-lm",
            "data": {"name": "text", "root": str(texts), "seq_len": 16},  # tokenizer: the source folder's
            "train": {"steps": 6, "batch_size": 8, "log_every": 2}, "optim": {"lr": 3e-3},
            "output": str(tmp_path / "o")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    r = train(load_recipe(tmp_path / "r.yaml"), device="cpu")
    losses = [x["loss"] for x in r.history if x.get("split") == "train"]
    assert r.eval["ce"] < 4.4 and losses[-1] < losses[0]  # ln 80 = 4.38: it learns from the first steps


@pytest.mark.parametrize("change,needle", [
    ({"root": "missing"}, "no text for split `train` in missing"),
    ({"seq_len": 1}, "`data.seq_len` in r.yaml must be an integer >= 2"),
    ({"seq_len": 100000}, "fewer than one sequence of `data.seq_len` 100000"),
])
def test_bad_text_data_is_one_line(cli, model_folder, texts, tmp_path, change, needle):
    data = {"model": {"source": str(model_folder)}, "task": "causal-lm",
            "data": {"name": "text", "root": str(texts), "seq_len": 16, **change},
            "train": {"steps": 1}, "output": str(tmp_path / "o")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    one_line(cli("finetune", str(tmp_path / "r.yaml")), needle)


def test_text_needs_a_tokenizer_when_the_source_has_none(cli, tmp_path, texts):
    data = {"model": {"source": "transformers:LlamaForCausalLM", "pretrained": False,
                      "kwargs": {"vocab_size": 80, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                 "intermediate_size": 64}},
            "task": "causal-lm", "data": {"name": "text", "root": str(texts)}, "train": {"steps": 1},
            "output": str(tmp_path / "o")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    one_line(cli("finetune", str(tmp_path / "r.yaml")), "`data.tokenizer` is required for `data.name: text`")
