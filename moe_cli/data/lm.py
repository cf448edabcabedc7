"""Token sequences for causal language models: the built-in `lm-synthetic` set (generated, like `digits` for
images) and token folders of fixed-length sequences (`lm-tokens`: ``root/<split>.json`` + a raw array of shape
[sequences, length], the token-folder format of :mod:`moe_cli.data.tokens` with 2-D sequences).

`lm-synthetic` is a sparse order-2 Markov source over ``vocab`` ids: every pair of previous tokens allows only
three next tokens (with probabilities 0.7, 0.2, 0.1), so the best possible perplexity is about 2.2 while a model
that knows only token frequencies stays near the vocabulary size: a tiny model has structure to learn on CPU in
minutes. Train and validation sequences come from the same chain with different seeds."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from moe_cli.data.tokens import TokenDataset, check_token_ids, read_spec
from moe_cli.errors import ConfigError

SYNTHETIC = {"vocab_size": 64, "length": 64, "train": 2048, "validation": 256}
NEXT = (0.7, 0.2, 0.1)  # the three allowed next tokens of each context, by probability


def synthetic_sequences(sequences: int, length: int = SYNTHETIC["length"], vocab: int = SYNTHETIC["vocab_size"],
                        seed: int = 0) -> np.ndarray:
    """(sequences, length) int64 ids from the order-2 Markov source; the chain (its table) is fixed, ``seed``
    draws the sequences."""
    table = np.random.default_rng(1234).integers(0, vocab, size=(vocab, vocab, len(NEXT)))
    rng = np.random.default_rng(seed)
    out = np.empty((sequences, length), dtype=np.int64)
    out[:, :2] = rng.integers(0, vocab, size=(sequences, 2))
    picks = rng.choice(len(NEXT), size=(sequences, length), p=NEXT)
    for t in range(2, length):
        out[:, t] = table[out[:, t - 2], out[:, t - 1], picks[:, t]]
    return out


class Sequences(Dataset):
    """In-memory token sequences as (ids,) int64 tensors."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = torch.from_numpy(tokens)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.tokens[i],)


def lm_synthetic(training: bool, vocab_size: int) -> Dataset:
    """The built-in `lm-synthetic` split for a model with ``vocab_size`` ids."""
    if vocab_size < SYNTHETIC["vocab_size"]:
        raise ConfigError(f"`data.name: lm-synthetic` has {SYNTHETIC['vocab_size']} token ids; the model's vocabulary "
                          f"has {vocab_size}")
    split = "train" if training else "validation"
    return Sequences(synthetic_sequences(SYNTHETIC[split], seed=0 if training else 1))


def lm_tokens(root: str | os.PathLike, split: str, vocab_size: int) -> TokenDataset:
    """A token folder's split of fixed-length sequences (shape [N, T]), checked against the model's vocabulary."""
    spec = read_spec(root, split, dims=2)
    if spec.vocab_size > vocab_size:
        raise ConfigError(f"{spec.path}: vocab_size {spec.vocab_size} is larger than the model's {vocab_size}")
    check_token_ids(np.memmap(spec.file, dtype=spec.dtype, mode="r", shape=spec.shape), spec.path, spec.vocab_size)
    return TokenDataset(spec)


TEXT_SUFFIXES = (".txt", ".jsonl")


def text_files(root: str | os.PathLike, split: str) -> list:
    """The text of a split: ``root/<split>.txt`` / ``root/<split>.jsonl``, or every .txt / .jsonl file under
    ``root/<split>/`` (sorted); one line naming what was looked for when there is none."""
    from pathlib import Path

    root = Path(root)
    files = [root / f"{split}{s}" for s in TEXT_SUFFIXES if (root / f"{split}{s}").is_file()]
    if (root / split).is_dir():
        files += sorted(p for p in (root / split).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"no text for split `{split}` in {root}: expected {split}.txt, {split}.jsonl or a folder "
                          f"{split}/ of .txt / .jsonl files")
    return files


def read_texts(path) -> list[str]:
    """A .txt file as one document; a .jsonl file's `text` fields, one document per line."""
    import json

    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{path}:{n} must be a JSON object with a string `text`")
        texts.append(record["text"])
    return texts


def load_tokenizer(spec: str):
    """The tokenizer of a transformers folder or ``hf-hub:org/name`` (through the cache offline)."""
    from moe_cli.models.hf import transformers_module

    tf = transformers_module()
    try:
        return tf.AutoTokenizer.from_pretrained(spec.removeprefix("hf-hub:"))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"no tokenizer in {spec} ({str(e).splitlines()[0][:160]}); set `data.tokenizer` to a "
                          "transformers folder or hf-hub:org/name that has one") from None


def text_dataset(root: str | os.PathLike, split: str, tokenizer: str | None, seq_len: int, vocab_size: int) -> Dataset:
    """The split's documents tokenized with ``tokenizer`` (each followed by its end-of-text id), concatenated and cut
    into sequences of ``seq_len`` tokens (the remainder dropped), as a causal LM is pre-trained."""
    if tokenizer is None:
        raise ConfigError("`data.tokenizer` is required for `data.name: text` (a transformers folder or "
                          "hf-hub:org/name with the tokenizer; by default the recipe's model.source when it is one)")
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    ids: list[int] = []
    for path in text_files(root, split):
        for text in read_texts(path):
            ids += tok(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the `{split}` text in {root} gives {len(ids)} tokens, fewer than one sequence of "
                          f"`data.seq_len` {seq_len}")
    tokens = np.asarray(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    if int(tokens.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer} gives id {int(tokens.max())}, beyond the model's vocabulary "
                          f"({vocab_size}); use the model's own tokenizer")
    return Sequences(tokens)
