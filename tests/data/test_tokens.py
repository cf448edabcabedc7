"""Token folders (a memory-mapped array + JSON per split): round trip, and every malformed spec as one line."""

import json

import numpy as np
import pytest
import torch

from moe_cli.data.tokens import TokenDataset, read_spec, token_dataset, write_tokens
from moe_cli.errors import ConfigError


def test_token_files_roundtrip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, size=(5, 2, 3, 4))
    write_tokens(tmp_path, "train", tokens, vocab_size=300)
    spec = read_spec(tmp_path, "train")
    assert spec.shape == (5, 2, 3, 4) and spec.dtype == "uint16" and spec.vocab_size == 300
    ds = TokenDataset(spec)
    assert len(ds) == 5 and ds[3][0].dtype == torch.int64
    assert torch.equal(ds[3][0], torch.from_numpy(tokens[3]))
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_token_data_errors(tmp_path):
    write_tokens(tmp_path, "train", np.zeros((4, 3, 3, 3), dtype=np.int64) + 15, vocab_size=16)
    with pytest.raises(ConfigError, match=r"split `val` not found.*found splits: train"):
        read_spec(tmp_path, "val")
    with pytest.raises(ConfigError, match=r"sequences are \[3, 3, 3\].*expects \[2, 3, 3\]"):
        token_dataset(tmp_path, "train", (2, 3, 3), 16)
    with pytest.raises(ConfigError, match="larger than the model's 8"):
        token_dataset(tmp_path, "train", (3, 3, 3), 8)
    meta = json.loads((tmp_path / "train.json").read_text())
    cases = [({**meta, "shape": [5, 3, 3, 3]}, "needs"), ({**meta, "dtype": "float32"}, "`dtype`"),
             ({k: v for k, v in meta.items() if k != "vocab_size"}, "missing `vocab_size`"),
             ({**meta, "shape": [4, 3, 3]}, "`shape`"), ({**meta, "file": "nope.bin"}, "does not exist"),
             ({**meta, "vocab_size": 10}, "token id 15")]
    for bad, needle in cases:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError) as e:
            token_dataset(tmp_path, "bad", (3, 3, 3), 16)
        assert needle in str(e.value) and "bad.json" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_spec(tmp_path, "bad")
