"""The `mae` task: masking, patch layout, loss and LPIPS falling on a fixed batch, checkpoints that rebuild the
wrapper, upcycling only the encoder, and a classifier fine-tuned from the MAE encoder (a `then:` run)."""

import json

import pytest
import timm
import torch
from conftest import seed_alexnet, write_recipe
from torch.utils.data import DataLoader, TensorDataset

from moe_cli.data.digits import digits
from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.models.lpips import lpips_model
from moe_cli.models.mae import MaskedAutoencoder
from moe_cli.models.surgery import find_ffns, moe_layers
from moe_cli.recipe import load_recipe, recipe_chain
from moe_cli.tasks import MAETask
from moe_cli.tasks.mae import MAECfg
from moe_cli.train.build import build_model
from moe_cli.train.loop import train

ENC = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
MAE_KW = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def tiny_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return timm.create_model("mae_vit", encoder="vit_tiny_patch16_224", encoder_kwargs=ENC, **{**MAE_KW, **kw})


def test_masking_and_patch_layout():
    mae = tiny_mae(mask_ratio=0.75)
    mask = mae.random_mask(5, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16) and (mask.sum(1) == 12).all()
    assert not torch.equal(mask[0], mask[1])  # a different mask per image
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)
    # patchify matches the patch embedding's token order: its conv is a linear map of each patch
    pe = mae.encoder.patch_embed
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(pe.proj.weight.shape[0], -1)
    torch.testing.assert_close(mae.patchify(x) @ w.T + pe.proj.bias, pe(x), atol=1e-5, rtol=1e-5)
    # the encoder sees only the visible patches: changing a masked patch changes nothing it outputs
    mae.eval()
    m = mae.random_mask(2, torch.device("cpu"), torch.Generator().manual_seed(1))
    y = x.clone()
    idx = m[0].nonzero()[0].item()
    r, c = divmod(idx, 4)
    y[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5
    torch.testing.assert_close(mae.forward_encoder(x, m), mae.forward_encoder(y, m))
    # eval-mode forwards without a mask are reproducible (fixed seed), training-mode ones are not
    torch.testing.assert_close(mae(x), mae(x))


def test_norm_pix_target_and_reconstruction_keeps_visible_patches():
    mae = tiny_mae(norm_pix_loss=True)
    x = digits("val", 32).images[:3]
    t = mae.target(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 16), atol=1e-4, rtol=0)
    mask = mae.random_mask(3, torch.device("cpu"), torch.Generator().manual_seed(0))
    recon = mae.reconstruct(x, t, mask)  # predicting the target exactly reconstructs the image
    torch.testing.assert_close(recon, x, atol=1e-3, rtol=0)
    recon = mae.reconstruct(x, torch.zeros_like(t), mask)
    vis = ~mask
    torch.testing.assert_close(mae.patchify(recon)[vis], mae.patchify(x)[vis])
    assert mae.loss(x, t, mask).item() < 1e-6


def test_mae_loss_and_lpips_fall_on_fixed_batch(torch_hub):
    """50 steps on one fixed batch: the masked-patch loss and the reconstructions' LPIPS (seeded AlexNet) fall."""
    seed_alexnet(torch_hub)
    lp = lpips_model()
    images = digits("val", 32).images[:16]
    loader = DataLoader(TensorDataset(images, torch.zeros(16)), batch_size=16)
    task = MAETask(MAECfg(**MAE_KW, mask_ratio=0.75, norm_pix_loss=False))
    mae = tiny_mae(norm_pix_loss=False)
    before = task.evaluate(mae, loader, torch.device("cpu"), lpips=lp)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    mae.train()
    losses = []
    for _ in range(50):
        loss, _ = task.loss(mae, (images,))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = task.evaluate(mae, loader, torch.device("cpu"), lpips=lp)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert after["loss"] < 0.6 * before["loss"]
    assert after["mse"] < 0.6 * before["mse"]
    assert after["lpips"] < before["lpips"], (before, after)


def mae_recipe(tmp_path, **sections):
    sections = {"model": {"kwargs": {**ENC, "num_classes": 10}}, "mae": MAE_KW, **sections}
    return write_recipe(tmp_path / "mae.yaml", tmp_path / "mae", task="mae", **sections)


def test_mae_run_then_classifier_from_encoder(tmp_path):
    then = {"task": "classify", "model": {"kwargs": {"num_classes": 10}}, "train": {"steps": 4, "batch_size": 32},
            "output": str(tmp_path / "cls")}
    recipe = load_recipe(mae_recipe(tmp_path, train={"steps": 6, "batch_size": 32}, then=then))
    chain = recipe_chain(recipe)
    assert [r.task for r in chain] == ["mae", "classify"]
    assert chain[1].model.source == str(tmp_path / "mae" / "final") and chain[1].train.steps == 4
    assert chain[1].data == chain[0].data  # inherited

    first = train(chain[0])
    assert set(first.eval) >= {"loss", "mse"}
    ck = load_checkpoint(first.final)
    assert ck.task == "mae" and isinstance(ck.model, MaskedAutoencoder)
    assert ck.architecture["name"] == "mae_vit" and ck.architecture["kwargs"]["encoder_kwargs"]["num_classes"] == 0
    x = digits("val", 32).images[:4]
    trained = first.ckpt.model.eval()
    rebuilt = ck.model.eval()(x)  # rebuilt from metadata alone (on CPU), against the trained model on its device
    torch.testing.assert_close(rebuilt, trained(x.to(next(trained.parameters()).device)).cpu())

    start = build_model(chain[1]).model.state_dict()  # the classifier starts from the MAE encoder's weights
    enc = ck.model.encoder.state_dict()
    assert set(start) - set(enc) == {"head.weight", "head.bias"} and start["head.weight"].shape == (10, 64)
    assert all(torch.equal(start[k], enc[k]) for k in enc)

    second = train(chain[1])
    cls = load_checkpoint(second.final)
    assert cls.task == "classify" and cls.architecture["name"] == "vit_tiny_patch16_224"
    assert cls.model(x).shape == (4, 10) and 0 <= second.eval["accuracy"] <= 1


def test_mae_with_moe_encoder_and_classifier_keeps_experts(tmp_path):
    path = mae_recipe(tmp_path, train={"steps": 3, "batch_size": 16},
                      model={"kwargs": {**ENC, "num_classes": 10}, "upcycle": {"experts": 4, "k": 2}},
                      then={"task": "classify", "model": {"kwargs": {"num_classes": 10}}, "train": {"steps": 2},
                            "output": str(tmp_path / "cls")})
    first, second = recipe_chain(load_recipe(path))
    mae_ck = train(first).ckpt
    assert mae_ck.moe.layers == ("encoder.blocks.0.mlp", "encoder.blocks.1.mlp")
    assert [n for n, _ in moe_layers(mae_ck.model)] == list(mae_ck.moe.layers)  # decoder FFNs stay dense
    assert len(find_ffns(mae_ck.model.decoder_blocks)) == 1
    cls = load_checkpoint(train(second).final)
    assert cls.moe.layers == ("blocks.0.mlp", "blocks.1.mlp") and len(moe_layers(cls.model)) == 2


def test_mae_eval_cli(tmp_path, cli, torch_hub):
    final = train(load_recipe(mae_recipe(tmp_path, train={"steps": 2, "batch_size": 16}))).final
    r = cli("eval", str(final.parent), "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["mse"] > 0 and "routing" in out and "accuracy" not in out
    r = cli("eval", str(final.parent), "--metric", "accuracy,mse", "--json")
    assert "does not apply" in json.loads(r.stdout)["accuracy"]["skipped"]
    # no AlexNet in this test's cache: the other metrics are reported, LPIPS gets one line saying why not
    r = cli("eval", str(final.parent), "--metric", "mse,lpips", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mse"] > 0 and "alexnet" in r.stderr.lower()
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("warning: lpips skipped")
    seed_alexnet(torch_hub)
    r = cli("eval", str(final.parent), "--metric", "mse,lpips", "--json")
    out = json.loads(r.stdout)
    assert 0 < out["lpips"] < 1 and out["mse"] > 0


@pytest.mark.parametrize("kwargs, needle", [
    ({"task": "mae", "model": {"source": "convnext_atto", "kwargs": {}}}, "VisionTransformer"),
    ({"task": "mae", "mae": {"mask_ratio": 1.0}}, "mae.mask_ratio"),
    ({"task": "mae", "mae": {"decoder_dim": 30, "decoder_heads": 4}}, "divisible"),
    ({"then": {"task": "classify"}}, "then.output"),
])
def test_mae_recipe_errors(tmp_path, cli, kwargs, needle):
    r = cli("finetune", write_recipe(tmp_path / "r.yaml", tmp_path / "out", **kwargs))
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_classifier_from_mae_needs_num_classes(tmp_path, cli):
    final = train(load_recipe(mae_recipe(tmp_path, train={"steps": 1, "batch_size": 8}))).final
    r = cli("finetune", write_recipe(tmp_path / "c.yaml", tmp_path / "c", model={"source": str(final.parent),
                                                                                  "kwargs": {}}))
    assert r.exit_code == 2 and "num_classes" in r.stderr
