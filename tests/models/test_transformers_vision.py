"""Hugging Face transformers vision models in: tiny ViT, DeiT, DINOv2 (GELU and SwiGLU), CLIP (whole model and
vision tower) and SigLIP vision towers built with transformers and saved in its own layout (a folder, and the Hub
cache offline) load as moe-cli image classifiers whose logits / features are transformers' own; upcycled (copy,
split at k = E) they compute what the dense model did; the MoE checkpoint loads back to the same logits; the
repository's preprocessor_config.json becomes the data config; a few training steps on digits lower the loss."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_line, seed_hub_cache
from tolerance import assert_close_scaled

transformers = pytest.importorskip("transformers")

from moe_cli.errors import ConfigError, ModelSourceError  # noqa: E402
from moe_cli.io.checkpoint import load_checkpoint, save  # noqa: E402
from moe_cli.io.sources import load_source  # noqa: E402
from moe_cli.models.hf_vision import ImageClassifier, data_config  # noqa: E402
from moe_cli.models.surgery import upcycled_copy  # noqa: E402
from moe_cli.moe.layer import moe_layers  # noqa: E402

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "image_size": 32, "patch_size": 8}
DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 32,
        "patch_size": 8}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
# name -> (class saved, its config, the classifier class transformers reads it with, or None for a backbone)
MODELS = {
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)),
            "ViTForImageClassification"),
    "deit": (lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**SMALL, num_labels=5)),
             "DeiTForImageClassification"),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO)), None),
    "dinov2-swiglu": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO, use_swiglu_ffn=True)), None),
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(vision_config=SMALL, text_config=TEXT)), None),
    "clip-vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)), None),
    "siglip-vision": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)), None),
}


def tiny(name: str, folder):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    model.save_pretrained(folder)
    return model


def images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def features(model, x):
    """The vision backbone's last hidden states, from transformers' own model (a backbone, or CLIP's vision
    tower inside the whole model)."""
    if isinstance(model, transformers.CLIPModel):
        return model.vision_model(pixel_values=x).last_hidden_state
    return model(pixel_values=x).last_hidden_state


def backbone(clf: ImageClassifier):
    hf = clf.hf
    return getattr(hf, "vision_model", None) or hf.base_model


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_is_transformers_and_upcycling_keeps_it(tmp_path, name):
    model = tiny(name, tmp_path / "dense")
    size = 224 if name.startswith("dinov2") else 32  # DINOv2 takes its processor's size (the default: 224)
    x = images(size=size)
    src = load_source(str(tmp_path / "dense"), model_kwargs={"num_classes": 7})
    assert isinstance(src.model, ImageClassifier) and src.task == "classify" and src.moe is None
    assert src.model.num_classes == 7 and src.model.pretrained_cfg["input_size"] == (3, size, size)
    with torch.no_grad():
        logits = src.model(x)
        assert logits.shape == (2, 7)
        reference = MODELS[name][1]
        if reference:  # a classifier: its logits (head re-drawn for 7 classes) are transformers' own model's
            want = getattr(transformers, reference).from_pretrained(
                tmp_path / "dense", num_labels=7, ignore_mismatched_sizes=True).eval()
            want.classifier.load_state_dict(src.model.hf.classifier.state_dict())
            assert_close_scaled(logits, want(pixel_values=x).logits, torch.float32)
        else:  # a backbone: its features are transformers' own
            assert_close_scaled(backbone(src.model)(pixel_values=x).last_hidden_state, features(model, x),
                                torch.float32)
    for fields in ({"experts": 4, "k": 2}, {"experts": 4, "k": 4, "init": "split"}):
        sparse, _ = upcycled_copy(src.model, **fields)
        assert len(moe_layers(sparse)) == 2 and all(".mlp" in n for n, _ in moe_layers(sparse)), fields
        with torch.no_grad():
            assert_close_scaled(sparse(x), logits, torch.float32)
    src.model = sparse
    back = load_checkpoint(save(src, tmp_path / "moe"))
    assert back.model.pretrained_cfg["input_size"] == (3, size, size) and back.data_config == src.data_config
    with torch.no_grad():
        assert_close_scaled(back.model(x), sparse(x), torch.float32)


def test_a_fresh_classifier_is_the_same_on_every_load(tmp_path):
    tiny("dinov2", tmp_path / "d")
    a = load_source(str(tmp_path / "d"), model_kwargs={"num_classes": 3}).model.hf.classifier.weight
    b = load_source(str(tmp_path / "d"), model_kwargs={"num_classes": 3}).model.hf.classifier.weight
    assert torch.equal(a, b)


def test_the_preprocessor_config_is_the_data_config(tmp_path):
    tiny("vit", tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                                   image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(tmp_path / "vit")
    src = load_source(str(tmp_path / "vit"))
    assert src.data_config == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "squash"}
    # shortest edge 256 then a 224 center crop (CLIP / DINOv2 style): crop fraction 0.875, aspect kept
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           resample=2).to_dict()
    cfg = data_config(clip, "x")
    assert cfg["input_size"] == [3, 224, 224] and cfg["crop_pct"] == pytest.approx(0.875)
    assert cfg["crop_mode"] == "center" and cfg["interpolation"] == "bilinear"
    assert data_config({**clip, "do_normalize": False}, "x")["std"] == [1.0] * 3
    with pytest.raises(ModelSourceError, match=r"x: `size` must be a size in pixels"):
        data_config({**clip, "size": {"longest": 3}}, "x")
    with pytest.raises(ConfigError, match=r"x: `image_std` must be three finite numbers > 0"):
        data_config({**clip, "image_std": [0, 1, 1]}, "x")
    # the stored data config is what moe eval reads images with (mean and std of the repository)
    from moe_cli.config import DataCfg
    from moe_cli.data.loaders import build_dataset

    ds = build_dataset(DataCfg(name="digits"), False, src.model, src.data_config)
    x = ds[0][0]
    assert x.shape == (3, 32, 32) and float(x.min()) >= (0 - 0.3) / 0.6 - 1e-5  # (0 - mean) / std of channel 2


@pytest.mark.long
def test_hub_repo_through_the_cache_and_bad_inputs_are_one_line(tmp_path, cli):
    tiny("clip-vision", tmp_path / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(tmp_path / "clip")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MOE_DEVICE": "cpu"}
    seed_hub_cache(tmp_path / "hub", "org/tiny-clip", tmp_path / "clip")
    out = tmp_path / "clip-moe"
    r = subprocess.run([sys.executable, "-m", "moe_cli", "upcycle", "hf-hub:org/tiny-clip", "--experts", "4",
                        "--k", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "verify: max |dense - moe|" in r.stdout and not r.stderr.strip(), r.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.source == "hf-hub:org/tiny-clip" and ckpt.data_config["crop_pct"] == 1.0
    assert ckpt.architecture["name"] == "transformers:CLIPForImageClassification"
    # a preprocessor_config.json that is not JSON, and weights that do not match config.json
    (tmp_path / "clip" / "preprocessor_config.json").write_text("{")
    one_line(cli("upcycle", str(tmp_path / "clip"), "--out", str(tmp_path / "o")),
             "preprocessor_config.json is not valid JSON")
    tiny("vit", tmp_path / "vit")
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    one_line(cli("upcycle", str(tmp_path / "vit"), "--out", str(tmp_path / "o")),
             "do not match its config.json: `vit.layers.0.mlp.fc1.bias` is of another shape")
    assert not (tmp_path / "o").exists()


def test_model_kwargs_other_than_num_classes_are_refused(tmp_path):
    tiny("vit", tmp_path / "vit")
    with pytest.raises(ModelSourceError, match=r"`model.kwargs.depth` does not apply .* \(only num_classes"):
        load_source(str(tmp_path / "vit"), model_kwargs={"depth": 3})
    with pytest.raises(ModelSourceError, match=r"`model.kwargs.num_classes` must be a positive integer"):
        load_source(str(tmp_path / "vit"), model_kwargs={"num_classes": 0})


def test_a_few_steps_on_digits_lower_the_loss(tmp_path, cli):
    tiny("vit", tmp_path / "vit")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  source: {tmp_path / 'vit'}\n  kwargs: {{num_classes: 10}}\n"
                      "  upcycle: {experts: 4, k: 2}\ndata:\n  name: digits\noptim: {name: adamw, lr: 3.0e-3}\n"
                      f"train:\n  steps: 100\n  batch_size: 64\n  eval_every: 100\n  log_every: 1\n"
                      f"output: {tmp_path / 'run'}\n")
    r = cli("finetune", str(recipe))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("split") == "train"]
    final = next(row for row in rows if row.get("split") == "val")
    # learning: the loss falls and the model beats chance (10 classes: CE log 10 = 2.30, accuracy 10%)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02 and final["accuracy"] > 0.2 and final["ce"] < 2.2
    assert load_checkpoint(tmp_path / "run" / "final").model.num_classes == 10
