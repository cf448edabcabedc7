"""`moe eval`: metrics on checkpoints whose behaviour the tests control, FLOPs vs the analytic count,
inference-time overrides, and LPIPS with a torch cache the test seeds itself."""

import copy
import json

import pytest
import torch
from conftest import TINY, seed_alexnet, tiny_model
from torch import nn

from moe_cli.data.digits import digits
from moe_cli.errors import MoeError
from moe_cli.io.checkpoint import Checkpoint, save
from moe_cli.models.flops import gflops_per_image, param_counts
from moe_cli.models.lpips import ALEXNET_FILE, lpips_distance, lpips_model
from moe_cli.models.surgery import upcycle
from moe_cli.moe.layer import MoEMlp
from moe_cli.moe.recorder import routing_stats

NAME, KWARGS = TINY["vit"]


def saved_moe(tmp_path, k=2, name="moe"):
    model, cfg = upcycle(tiny_model("vit"), experts=4, k=k)
    save(Checkpoint(model, {"name": NAME, "kwargs": KWARGS}, source=NAME), tmp_path / name)
    return tmp_path / name


def test_accuracy_and_ce_on_controlled_predictions(tmp_path, cli):
    model = tiny_model("vit")
    with torch.no_grad():  # the head ignores its input: always class 3, with known probabilities
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(10.0) * 0.1 + torch.nn.functional.one_hot(torch.tensor(3), 10) * 2)
    save(Checkpoint(model, {"name": NAME, "kwargs": KWARGS}), tmp_path / "ck")
    r = cli("eval", str(tmp_path / "ck"), "--data", "digits", "--metric", "accuracy,ce", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    labels = digits("val").labels
    logp = model.head.bias.detach().log_softmax(0)
    assert out["accuracy"]["top1"] == pytest.approx((labels == 3).float().mean().item())
    top5 = set(model.head.bias.detach().topk(5).indices.tolist())
    assert out["accuracy"]["top5"] == pytest.approx(sum(int(y) in top5 for y in labels) / len(labels))
    assert out["ce"] == pytest.approx(-logp[labels].mean().item(), rel=1e-5)


class Wrap(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)


def test_routing_stats_hand_built_router():
    moe = MoEMlp(8, 16, num_experts=4, k=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -2.0])[:, None].expand(4, 8))
    x = torch.ones(6, 5, 8)  # 6 "images" of 5 identical tokens
    stats = routing_stats(Wrap(moe), [(x[:3], None), (x[3:], None)], torch.device("cpu"))["moe"]
    assert stats["load"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    w = torch.tensor([8.0, 4.0]).softmax(0)
    assert stats["entropy"] == pytest.approx(-(w * w.log()).sum().item(), rel=1e-5)
    assert stats["variation"] == pytest.approx(0.0, abs=1e-6)  # every image uses the experts alike
    assert stats["dropped"] == 0.0


def analytic_vit_gflops(model, moe_k=None, experts=4) -> float:
    """Multiply-adds x 2 of a timm ViT forward per image, straight from its shapes."""
    D = model.embed_dim
    p = model.patch_embed.patch_size[0]
    n_patch = model.patch_embed.num_patches
    N = n_patch + model.num_prefix_tokens
    H = model.blocks[0].mlp.fc1.out_features if hasattr(model.blocks[0].mlp, "fc1") else \
        model.blocks[0].mlp.experts.w1.shape[1]
    C = model.head.out_features
    per_block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D
    mlp = 2 * 2 * N * D * H
    per_block += mlp * moe_k + 2 * N * D * experts if moe_k else mlp
    return (2 * n_patch * 3 * p * p * D + len(model.blocks) * per_block + 2 * D * C) / 1e9


@pytest.mark.parametrize("impl", ["auto", "loop", "grouped"])
def test_flops_match_analytic_count(impl):
    """Every dispatcher counts the same FLOPs (the grouped one runs its GEMMs inside a custom op, which torch's
    FlopCounterMode cannot look into: the count runs the layers op by op)."""
    dense = tiny_model("vit")
    sparse, _ = upcycle(copy.deepcopy(dense), experts=4, k=2, impl=impl)
    x = torch.randn(4, 3, 32, 32)
    for model, k in ((dense, None), (sparse, 2)):
        assert gflops_per_image(model, x) == pytest.approx(analytic_vit_gflops(model, k), rel=0.02)


def test_disable_expert_gets_no_tokens_and_top_k_changes_active_params(tmp_path, cli):
    ck = saved_moe(tmp_path)
    r = cli("eval", str(ck), "--data", "digits", "--metric", "routing,flops", "--disable-experts", "0:1,1:3",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["routing"]["blocks.0.mlp"]["load"][1] == 0.0
    assert out["routing"]["blocks.1.mlp"]["load"][3] == 0.0
    assert min(out["routing"]["blocks.0.mlp"]["load"][i] for i in (0, 2, 3)) > 0
    k2 = json.loads(cli("eval", str(ck), "--data", "digits", "--metric", "flops", "--json").stdout)["flops"]
    k1 = json.loads(cli("eval", str(ck), "--data", "digits", "--metric", "flops", "--top-k", "1",
                         "--json").stdout)["flops"]
    model, _ = upcycle(tiny_model("vit"), experts=4, k=2)
    per_expert = model.blocks[0].mlp.experts.params_per_expert()
    assert k2["params_active"] - k1["params_active"] == 2 * per_expert  # one expert fewer in each of 2 layers
    assert k1["params_total"] == k2["params_total"] == param_counts(model)[0]
    assert k1["gflops_per_image"] < k2["gflops_per_image"]
    assert k2["dense"]["params_total"] < k2["params_total"]


def test_eval_errors(tmp_path, cli):
    ck = saved_moe(tmp_path)
    for args, needle in ((["--disable-experts", "0:1,0:2,0:3"], "fewer than k"),
                         (["--disable-experts", "7:0"], "layer 7 does not exist"),
                         (["--disable-experts", "zero"], "LAYER:EXPERT"),
                         (["--top-k", "9"], "--top-k"), (["--metric", "speed"], "--metric")):
        r = cli("eval", str(ck), *args)
        assert r.exit_code == 2 and needle in r.stderr, (args, r.stderr)
    r = cli("eval", str(ck), "--data", "digits", "--metric", "lpips")
    assert r.exit_code == 0 and "lpips does not apply" in r.output


def test_lpips_with_seeded_cache(torch_hub):
    seed_alexnet(torch_hub)
    model = lpips_model()
    a = digits("val", img_size=64).images[:4]
    assert torch.all(lpips_distance(a, a, model) == 0)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(a.shape, generator=gen)
    d = [lpips_distance(a, (a + s * noise).clamp(-1, 1), model).mean().item() for s in (0.05, 0.2, 0.6)]
    assert 0 < d[0] < d[1] < d[2]


def test_lpips_without_backbone_names_the_file(torch_hub):
    with pytest.raises(MoeError) as e:
        lpips_model()
    msg = str(e.value)
    assert ALEXNET_FILE in msg and str(torch_hub / "checkpoints") in msg and "\n" not in msg
