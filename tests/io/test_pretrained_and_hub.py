"""Real pretrained models and the Hub: each model is read with its own preprocessing (timm's data config of the
source, kept in the checkpoint), datasets fail in one line offline, a Hub fetch fails fast, and `moe push`
writes a repository that loads back through the Hub cache."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import seed_hub_cache, write_recipe
from huggingface_hub import ModelCard
from PIL import Image

from moe_cli.config import DataCfg
from moe_cli.errors import ConfigError, ModelSourceError
from moe_cli.io.checkpoint import load_checkpoint

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DEIT = ["deit_tiny_patch16_224", "--no-pretrained", "-m", "img_size=32", "-m", "depth=2", "-m", "num_classes=2"]


def white_folder(root):
    """An image folder whose every pixel is white: after normalisation each channel is (1 - mean) / std."""
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / split / label / "0.png")
    return root


def channel_values(x: torch.Tensor) -> list[float]:
    return x.reshape(x.shape[0], -1).mean(-1).tolist()


def expected(mean, std):
    return [(1 - m) / s for m, s in zip(mean, std, strict=True)]


def test_imagenet_models_get_imagenet_preprocessing_everywhere(cli, tmp_path):
    from moe_cli.data.loaders import calibration_batches, val_loader

    folder = white_folder(tmp_path / "data")
    assert cli("upcycle", *DEIT, "--experts", "2", "--k", "1", "--out", str(tmp_path / "moe")).exit_code == 0
    ck = load_checkpoint(tmp_path / "moe")
    assert ck.data_config["mean"] == pytest.approx(IMAGENET[0]) and ck.data_config["std"] == pytest.approx(IMAGENET[1])
    want = expected(*IMAGENET)
    # eval / inspect read the validation split through val_loader with the checkpoint's data config
    x, _ = next(iter(val_loader(ck.model, DataCfg(name="", root=str(folder)), 4, torch.device("cpu"),
                                ck.data_config)))
    assert channel_values(x[0]) == pytest.approx(want, abs=1e-4)
    # calibration (router init, merge, prune) too
    assert channel_values(calibration_batches(ck.model, str(folder), 1, ck.data_config)[0][0]) == pytest.approx(
        want, abs=1e-4)
    # finetune keeps the source's preprocessing in what it publishes
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model={"source": str(tmp_path / "moe"), "kwargs": {}},
                     data={"name": "", "root": str(folder)}, train={"steps": 1, "batch_size": 2})
    assert cli("finetune", f).exit_code == 0
    assert load_checkpoint(tmp_path / "run" / "final").data_config == ck.data_config
    # a ViT trained with mean/std 0.5 keeps [-1, 1]
    vit = load_checkpoint(tmp_path / "moe")
    vit.data_config = None
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=2)
    x, _ = next(iter(val_loader(model, DataCfg(name="", root=str(folder)), 4, torch.device("cpu"))))
    assert channel_values(x[0]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)


def test_digits_follow_the_model_and_the_recipe_can_override(tmp_path):
    import timm

    from moe_cli.data.loaders import build_dataset

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=1, num_classes=10)
    background = build_dataset(DataCfg(name="digits"), False, model)[0][0][:, 0, 0]  # a zero pixel, normalised
    assert background.tolist() == pytest.approx([-m / s for m, s in zip(*IMAGENET, strict=True)], abs=1e-5)
    cfg = DataCfg(name="digits", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert build_dataset(cfg, False, model)[0][0][:, 0, 0].tolist() == pytest.approx([-1.0] * 3)


# the recipe's preprocessing overrides are range-checked with the other recipe fields:
# tests/cli/test_refusals.py::test_recipe_ranges


def test_a_checkpoint_with_a_bad_data_config_is_one_line(cli, tmp_path):
    import safetensors.torch

    from moe_cli.io.checkpoint import read_metadata, read_tensors

    assert cli("upcycle", *DEIT, "--experts", "2", "--k", "1", "--out", str(tmp_path / "moe")).exit_code == 0
    src = tmp_path / "moe" / "model.safetensors"
    meta = {**read_metadata(src), "data_config": json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0, 1, 1]})}
    (tmp_path / "bad").mkdir()
    safetensors.torch.save_file(read_tensors(src), str(tmp_path / "bad" / "model.safetensors"), metadata=meta)
    r = cli("eval", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "metadata `data_config.std` must be three finite numbers > 0" in r.stderr


def test_torch_datasets_without_the_files_fail_in_one_line(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data={"name": "torch/cifar10", "root": str(tmp_path)})
    r = cli("finetune", f)
    assert r.exit_code == 2 and "cannot open dataset `torch/cifar10`" in r.stderr and "data.download: true" in r.stderr
    # with download, offline (every connection refused through a dead proxy): one line too, quickly
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "MOE_DEVICE": "cpu"}
    f = write_recipe(tmp_path / "r2.yaml", tmp_path / "out2", data={"name": "torch/cifar10", "root": str(tmp_path),
                                                                    "download": True})
    r = subprocess.run([sys.executable, "-m", "moe_cli", "finetune", f], capture_output=True, text=True, env=env,
                       timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "offline?" in lines[0], r.stderr


def test_a_failing_hub_fetch_returns_in_seconds(monkeypatch, tmp_path):
    """Before: about 55 s of retries without network. The endpoint here refuses connections at once."""
    from huggingface_hub import constants

    from moe_cli.io.sources import load_source

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    with pytest.raises(ModelSourceError, match="the Hub is unreachable or offline"):
        load_source("vit_tiny_patch16_224", pretrained=True, model_kwargs={"depth": 1})
    assert time.perf_counter() - t0 < 15  # with retries it took 55 s
    assert constants.HF_HUB_OFFLINE is False  # the offline switch is undone afterwards


def test_push_dry_run_writes_the_card_and_the_repo_loads_back_through_the_hub_cache(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model={"upcycle": {"experts": 2, "k": 1}},
                     train={"steps": 2, "batch_size": 16})
    assert cli("finetune", f).exit_code == 0
    assert cli("inspect", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "run" / "inspect"),
               "--images", "1").exit_code == 0
    r = cli("push", str(tmp_path / "run" / "final"), "me/vit-moe", "--dry-run", str(tmp_path / "dry"))
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "dry").iterdir())
    assert names == ["README.md", "config.json", "expert_load.png", "model.safetensors", "summary.json"]
    card = (tmp_path / "dry" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "moe-cli" and {"mixture-of-experts", "moe-cli"} <= set(front["tags"])
    assert "| MoE layers | 2 |" in card
    # the real chain: the recipe that upcycled and trained it (not a `moe upcycle` line it never ran)
    assert "## How it was made" in card and "moe upcycle" not in card
    made = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert made["model"]["upcycle"]["experts"] == 2 and made["train"]["steps"] == 2 and made["data"]["name"] == "digits"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"| accuracy | {summary['accuracy']:.4f} |" in card and "![expert load per layer](expert_load.png)" in card
    # the metadata the Hub reads, parsed back by huggingface_hub: eval results name the data they were measured on
    data = ModelCard.load(tmp_path / "dry" / "README.md").data
    assert data.pipeline_tag == "image-classification" and data.library_name == "moe-cli"
    assert data.base_model is None and data.license is None  # trained from scratch: no base model, no guessed license
    accuracy = next(r for r in data.eval_results if r.metric_type == "accuracy")
    assert accuracy.dataset_type == "digits" and accuracy.metric_value == pytest.approx(summary["accuracy"])
    assert accuracy.dataset_split == "validation" and data.model_name == "vit-moe"
    assert json.loads((tmp_path / "dry" / "config.json").read_text())["library_name"] == "moe-cli"
    # a pushed repository is what the Hub serves back: seed the cache with it and evaluate offline
    seed_hub_cache(tmp_path / "hub", "me/vit-moe", tmp_path / "dry")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MOE_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "-m", "moe_cli", "eval", "hf-hub:me/vit-moe", "--metric", "accuracy",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"]["top1"] == pytest.approx(summary["accuracy"], abs=1e-6)


def test_push_refuses_a_bad_repo_id_and_a_used_dry_run_folder(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 1})
    assert cli("finetune", f).exit_code == 0
    r = cli("push", str(tmp_path / "run" / "final"), "no-slash", "--dry-run", str(tmp_path / "dry"))
    assert r.exit_code == 2 and "ORG/NAME" in r.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    r = cli("push", str(tmp_path / "run" / "final"), "me/x", "--dry-run", str(tmp_path / "used"))
    assert r.exit_code == 2 and "not empty" in r.stderr
    with pytest.raises(ConfigError):
        from moe_cli.io.hub import stage

        stage(tmp_path / "run" / "final", "a/b/c", tmp_path / "o")


def test_a_hub_source_without_weights_explains_it_still_needs_the_config(monkeypatch, tmp_path):
    """Before: `--set model.pretrained=false` with hf-hub:1x-technologies/GENIE_35M offline said it could not fetch
    the model and suggested --no-pretrained, which was already the case."""
    from huggingface_hub import constants

    from moe_cli.io.sources import load_source

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelSourceError, match="without pretrained weights still needs the repository's config.json"):
        load_source("hf-hub:1x-technologies/GENIE_35M", pretrained=False)


@pytest.mark.long
def test_a_dense_push_loads_in_plain_timm_and_names_its_base_model(cli, tmp_path):
    import timm

    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 2, "batch_size": 16})
    assert cli("finetune", f).exit_code == 0
    assert cli("push", str(tmp_path / "run" / "final"), "me/digits-dense", "--dry-run", str(tmp_path / "dry")
               ).exit_code == 0
    config = json.loads((tmp_path / "dry" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["label_names"] == [str(i) for i in range(10)]
    seed_hub_cache(tmp_path / "hub", "me/digits-dense", tmp_path / "dry")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("import timm, torch, moe_cli; m = timm.create_model('hf-hub:me/digits-dense', pretrained=True).eval(); "
            "x = torch.randn(2, 3, 32, 32); ref = moe_cli.load('hf-hub:me/digits-dense'); "
            "print(float((m(x) - ref(x)).abs().max()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) < 1e-5  # plain timm reads the pushed weights as moe-cli does
    card = ModelCard.load(tmp_path / "dry" / "README.md")
    assert "timm.create_model('hf-hub:me/digits-dense', pretrained=True)" in card.text
    # a pretrained timm source is the base model of what is made from it, with its license
    from moe_cli.io.sources import load_source

    src = load_source("vit_tiny_patch16_224", pretrained=False)
    assert "base_model" not in src.extra and "license" not in src.extra
    weights = tmp_path / "tiny-weights"
    weights.mkdir()
    import safetensors.torch

    safetensors.torch.save_file(timm.create_model("vit_tiny_patch16_224").state_dict(),
                                str(weights / "model.safetensors"))
    seed_hub_cache(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights)
    code = ("from moe_cli.io.sources import load_source; e = load_source('vit_tiny_patch16_224').extra; "
            "print(e['base_model'], e['license'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "apache-2.0"]


def test_merged_and_pruned_checkpoints_keep_their_data_and_chain(cli, tmp_path):
    """`moe merge` (to one expert: the dense architecture) and `moe prune` keep what the checkpoint was trained on
    (so `moe eval` needs no --data) and add their step to the chain the model card shows."""
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model={"upcycle": {"experts": 2, "k": 1}},
                     train={"steps": 2, "batch_size": 16})
    assert cli("finetune", f).exit_code == 0
    for command, flags in (("merge", ["--experts", "1"]), ("prune", ["--keep", "1"])):
        out = tmp_path / command
        assert cli(command, str(tmp_path / "run" / "final"), *flags, "-o", str(out)).exit_code == 0
        r = cli("eval", str(out), "--metric", "accuracy")
        assert r.exit_code == 0 and "digits" in r.stdout, r.output
        assert cli("push", str(out), f"me/{command}", "--dry-run", str(tmp_path / f"dry-{command}")).exit_code == 0
        card = (tmp_path / f"dry-{command}" / "README.md").read_text()
        made = card.split("## How it was made", 1)[1]
        assert "```yaml" in made and f"then `moe {command} CKPT {' '.join(flags)}`." in made, made
        assert ("dense model, in eval mode" in card) == (command == "merge")
