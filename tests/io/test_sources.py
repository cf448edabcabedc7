"""Model sources: timm names and aliases, a Hub cache laid out by the test (offline), local files."""

import json

import pytest
import safetensors.torch
import torch
from conftest import TINY, run_moe, tiny_model

import moe_cli
from moe_cli.errors import CheckpointError, ModelSourceError
from moe_cli.io.sources import load_source, resolve_timm_name
from moe_cli.models.probe import probe_batch


def test_short_names_resolve_to_timm_defaults():
    assert resolve_timm_name("vit_small") == "vit_small_patch16_224"
    assert resolve_timm_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"
    assert resolve_timm_name("vit_small.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"


def test_unknown_name_suggests():
    with pytest.raises(ModelSourceError, match="did you mean `vit_small`"):
        resolve_timm_name("vit_smal")


def write_hub_cache(root, repo_id: str, family: str = "vit") -> torch.nn.Module:
    """Lay out a Hugging Face Hub cache entry (refs/main -> snapshot) holding a tiny timm model."""
    model = tiny_model(family, seed=3)
    name, kwargs = TINY[family]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    config = {"architecture": name, "num_classes": kwargs["num_classes"], "model_args": model_args,
              "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": kwargs["num_classes"]}}
    (snap / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(model.state_dict(), str(snap / "model.safetensors"))
    return model


def test_hf_hub_offline_cache_upcycle(tmp_path):
    dense = write_hub_cache(tmp_path / "hub", "acme/tiny-vit")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    r = run_moe("upcycle", "hf-hub:acme/tiny-vit", "--experts", "2", "--k", "1", "--out", str(tmp_path / "o"),
                env=env)
    assert r.returncode == 0, r.stderr
    assert "verify" in r.stdout and "ok" in r.stdout
    loaded = moe_cli.load(tmp_path / "o")
    x = probe_batch(dense)
    torch.testing.assert_close(loaded(x), dense(x), rtol=0, atol=1e-5)  # the hub weights, not random ones


def test_hf_hub_missing_from_cache_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "hf")}
    r = run_moe("upcycle", "hf-hub:acme/absent", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2
    assert "could not fetch `acme/absent`" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_local_safetensors_with_arch_and_folder_config(tmp_path):
    dense = tiny_model("vit", seed=5)
    name, kwargs = TINY["vit"]
    f = tmp_path / "w.safetensors"
    safetensors.torch.save_file(dense.state_dict(), str(f))
    ck = load_source(str(f), arch=name, model_kwargs=kwargs)
    x = probe_batch(dense)
    assert torch.equal(ck.model.eval()(x), dense(x))
    with pytest.raises(ModelSourceError, match="--arch"):
        load_source(str(f))
    folder = tmp_path / "folder"
    folder.mkdir()
    safetensors.torch.save_file(dense.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": name, "model_args": kwargs}))
    assert torch.equal(load_source(str(folder)).model.eval()(x), dense(x))


def test_shape_mismatch_is_one_line(tmp_path):
    dense = tiny_model("vit")
    f = tmp_path / "w.safetensors"
    safetensors.torch.save_file(dense.state_dict(), str(f))
    with pytest.raises(CheckpointError, match="has shape"):
        load_source(str(f), arch="vit_tiny_patch16_224", model_kwargs={"depth": 2, "img_size": 32})
