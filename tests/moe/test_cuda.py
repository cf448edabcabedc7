"""On a CUDA machine (skipped elsewhere; bench/gpu_suite.sh runs them on a lent GPU): the grouped dispatcher's
bf16 plan runs F.grouped_mm there and matches the fp32 loop; auto picks the Triton kernels once their self-check
passes and matches the loop; Triton in fp32 is as exact as torch's fp32 matmuls (no silent TF32); a short
upcycle-and-finetune run in bf16 on the GPU ends with finite losses and a checkpoint whose model gives the same
outputs on the GPU and on the CPU."""

import json
import math

import pytest
import torch
from conftest import dispatcher_run, write_recipe
from timm.layers import Mlp, SwiGLU
from tolerance import tolerance

from moe_cli.moe.dispatchers import DISPATCHERS
from moe_cli.moe.dispatchers.grouped import grouped_supported
from moe_cli.moe.upcycling import from_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def perturbed_layer(dense, capacity_factor=None):
    torch.manual_seed(0)
    moe = from_dense(dense, 8, 2, capacity_factor=capacity_factor, normalize=False)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
        for p in moe.experts.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return moe.cuda()


@pytest.mark.parametrize("dense", [Mlp(64, 128), SwiGLU(64, 128, norm_layer=torch.nn.LayerNorm)],
                         ids=["mlp", "swiglu_norm"])
@pytest.mark.parametrize("impl", ["grouped", "triton", "auto"])
def test_bf16_paths_on_cuda_match_the_fp32_loop(dense, impl):
    moe = perturbed_layer(dense, capacity_factor=0.5)
    x = torch.randn(300, 64, device="cuda")
    d = DISPATCHERS[impl] if impl != "auto" else moe.dispatcher(x.bfloat16())
    if impl == "auto" and DISPATCHERS["triton"].supports(x):
        assert d.name == "triton"  # the self-check passed on this GPU
    if impl == "grouped" and grouped_supported(x, moe.experts.dims):
        assert DISPATCHERS["grouped"].runs_grouped_mm(x.bfloat16(), moe.experts)
    _, ref = dispatcher_run(DISPATCHERS["loop"], moe, x)
    _, got = dispatcher_run(d, moe, x, torch.bfloat16)
    for name, b in ref.items():
        rtol, atol = tolerance(b, torch.bfloat16, ulps=8)  # K 64-128 sums in bf16, not yet seen on a GPU
        torch.testing.assert_close(got[name].float(), b, rtol=rtol, atol=atol, msg=name)


def test_triton_fp32_on_cuda_is_ieee_fp32_like_torchs_matmuls():
    """Triton's tl.dot defaults to TF32 for fp32 inputs (~1e-3 relative error); torch's fp32 matmuls are IEEE
    unless the user allows TF32, and so are the kernels (dot_precision)."""
    assert torch.get_float32_matmul_precision() == "highest"
    moe = perturbed_layer(Mlp(64, 128))
    x = torch.randn(300, 64, device="cuda")
    (_, ref), (_, got) = dispatcher_run(DISPATCHERS["loop"], moe, x), dispatcher_run(DISPATCHERS["triton"], moe, x)
    for name, b in ref.items():
        rtol, atol = tolerance(b, ulps=2**8)
        torch.testing.assert_close(got[name], b, rtol=rtol, atol=atol, msg=name)


def test_upcycle_and_finetune_in_bf16_on_the_gpu(tmp_path, cli):
    from moe_cli.io.checkpoint import load_checkpoint

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", model={"upcycle": {"experts": 4, "k": 2}},
                          train={"steps": 8, "precision": "bf16"})
    r = cli("--device", "cuda", "finetune", recipe)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(math.isfinite(v) for v in losses), rows
    ck = load_checkpoint(tmp_path / "run" / "final")
    model = ck.model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    rtol, atol = tolerance(cpu, ulps=2**10)  # fp32 on two devices: TF32 or not, other kernels
    torch.testing.assert_close(gpu, cpu, rtol=rtol, atol=atol)
