"""The `masked-tokens` task: token data (memory map + JSON) and its errors, the cosine mask schedule, upcycling a
`maskgit_video` model (outputs preserved), training lowering masked-token CE, iterative decoding, LPIPS via a
user decoder."""

import json
import math

import pytest
import timm
import torch
import yaml
from conftest import seed_alexnet

from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.models.surgery import moe_layers, upcycled_copy
from moe_cli.models.upcycle import max_output_diff
from moe_cli.recipe import load_recipe, recipe_chain
from moe_cli.tasks import fill_masked, token_mask
from moe_cli.train.build import build_model
from moe_cli.train.loop import train

MODEL = {"vocab_size": 16, "frames": 3, "height": 3, "width": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_video(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("maskgit_video", **MODEL).eval()


def token_recipe(tmp_path, steps=40, then=None, **extra) -> str:
    data = {
        "model": {"source": "maskgit_video", "pretrained": False, "kwargs": MODEL},
        "task": "masked-tokens",
        "masked_tokens": {"decoder": "moe_cli.data.tokens:palette_decoder", "sample_steps": 3},
        "data": {"name": "tokens", "root": str(tmp_path / "tokens"),
                 "synthetic": {"train_sequences": 256, "val_sequences": 64, "frames": 3, "height": 3, "width": 3,
                               "vocab_size": 16, "seed": 0}},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "train": {"steps": steps, "batch_size": 32, "log_every": 10, "seed": 0},
        "output": str(tmp_path / "run"),
        **extra,
    }
    if then:
        data["then"] = then
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cosine_mask_schedule():
    gen = torch.Generator().manual_seed(0)
    mask = token_mask(4000, 27, torch.device("cpu"), gen)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 27
    # ratio = cos(pi/2 * U): its mean is 2/pi; ceil adds at most one token
    assert abs(counts.float().mean().item() / 27 - 2 / math.pi) < 0.03
    fixed = token_mask(6, 27, torch.device("cpu"), gen, ratio=0.5)
    assert (fixed.sum(1) == 14).all()


def test_upcycling_preserves_outputs():
    dense = tiny_video()
    tokens = dense.example_input(4, torch.Generator().manual_seed(0))
    tokens[:, 1, 0] = dense.mask_id  # with [MASK] tokens too
    for k in (1, 2):
        sparse, cfg = upcycled_copy(dense, experts=4, k=k)
        assert cfg.layers == ("blocks.0.mlp", "blocks.1.mlp")
        diff, scale = max_output_diff(dense, sparse, tokens)
        assert diff < 1e-5 * max(1.0, scale)


def test_upcycle_cli_on_video_model(tmp_path, cli):
    args = [a for key, value in MODEL.items() for a in ("-m", f"{key}={value}")]
    r = cli("upcycle", "maskgit_video", "--no-pretrained", *args, "--out", str(tmp_path / "moe"))
    assert r.exit_code == 0 and "ok" in r.output, r.output
    ck = load_checkpoint(tmp_path / "moe")
    assert len(moe_layers(ck.model)) == 2 and ck.model(ck.model.example_input(2)).shape == (2, 3, 3, 3, 16)
    r = cli("upcycle", "maskgit_video", *args, "--out", str(tmp_path / "x"))  # there are no pretrained weights
    assert r.exit_code == 2 and "no pretrained weights" in r.stderr and not (tmp_path / "x").exists()


def test_training_lowers_ce_and_upcycled_model_starts_where_dense_ended(tmp_path):
    then = {"model": {"upcycle": {"experts": 4, "k": 2}}, "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0},
            "schedule": {"name": "constant"}, "train": {"steps": 30, "batch_size": 32, "seed": 0},
            "output": str(tmp_path / "moe")}
    dense_recipe, moe_recipe = recipe_chain(load_recipe(token_recipe(tmp_path, steps=60, then=then)))
    assert (tmp_path / "tokens").exists() is False  # written on first use
    task_eval = recipe_task_eval(dense_recipe)
    before = task_eval(build_model(dense_recipe).model)
    dense = train(dense_recipe)
    assert (tmp_path / "tokens" / "train.json").is_file()
    assert dense.eval["ce"] < before["ce"] - 0.3 and dense.eval["accuracy"] > before["accuracy"]
    upcycled = build_model(moe_recipe)
    assert len(moe_layers(upcycled.model)) == 2
    start = task_eval(upcycled.model)
    assert abs(start["ce"] - dense.eval["ce"]) < 1e-4  # copy-initialised experts: same predictions
    moe = train(moe_recipe)
    assert moe.eval["ce"] < start["ce"]
    ck = load_checkpoint(moe.final)
    assert ck.task == "masked-tokens" and ck.task_config["decoder"] == "moe_cli.data.tokens:palette_decoder"


def recipe_task_eval(recipe):
    from moe_cli.data.loaders import val_loader

    task = recipe.make_task()

    def run(model):
        return task.evaluate(model, val_loader(model, recipe.data, 64, torch.device("cpu")), torch.device("cpu"))

    return run


def test_fill_masked_keeps_visible_tokens():
    model = tiny_video()
    tokens = model.example_input(3, torch.Generator().manual_seed(1))
    mask = token_mask(3, 27, torch.device("cpu"), torch.Generator().manual_seed(2), ratio=0.6).view_as(tokens)
    filled = fill_masked(model, tokens, mask, steps=4)
    assert torch.equal(filled[~mask], tokens[~mask])
    assert (filled < model.vocab_size).all()  # every [MASK] was replaced
    one_step = model(tokens.masked_fill(mask, model.mask_id)).argmax(-1)
    assert torch.equal(fill_masked(model, tokens, mask, steps=1)[mask], one_step[mask])


def test_eval_cli_ce_and_lpips(tmp_path, cli, torch_hub):
    result = train(load_recipe(token_recipe(tmp_path, steps=5)))
    ck = str(result.final.parent)
    r = cli("eval", ck, "--json")  # default data: the token folder it was trained on
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and abs(out["ce"] - result.eval["ce"]) < 1e-5 and "routing" in out
    assert out["accuracy"]["top1"] == pytest.approx(result.eval["accuracy"])
    seed_alexnet(torch_hub)
    # the decoder the checkpoint names is code: not run unless asked for on the command line
    out = json.loads(cli("eval", ck, "--metric", "ce,lpips", "--json").stdout)
    assert "--trust-checkpoint-code" in out["lpips"]["skipped"] and "ce" in out
    out = json.loads(cli("eval", ck, "--metric", "ce,lpips", "--trust-checkpoint-code", "--json").stdout)
    assert 0 < out["lpips"] < 1
    perfect = f"{tmp_path / 'dec.py'}:decode"  # a decoder that ignores tokens: identical frames, LPIPS 0
    (tmp_path / "dec.py").write_text("import torch\ndef decode(t):\n    return torch.zeros(*t.shape[:2], 3, 32, 32)\n")
    out = json.loads(cli("eval", ck, "--metric", "lpips", "--decoder", perfect, "--json").stdout)
    assert out["lpips"] == 0
    r = cli("eval", ck, "--metric", "lpips", "--decoder", "moe_cli.data.tokens:nothing")
    assert r.exit_code == 2 and "no function" in r.stderr and r.stderr.count("\n") == 1
    r = cli("eval", ck, "--data", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "validation" in r.stderr


def test_recipe_errors(tmp_path, cli):
    cases = [({"data": {"name": "digits"}}, "masked-tokens"),
             ({"model": {"source": "vit_tiny_patch16_224", "pretrained": False}}, "token model"),
             ({"masked_tokens": {"predict_frames": 3}}, "predict_frames")]
    for extra, needle in cases:
        r = cli("finetune", token_recipe(tmp_path, **extra))
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
