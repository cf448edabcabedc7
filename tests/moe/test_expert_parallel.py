"""Expert parallelism on 2 gloo ranks: each rank holds half the experts, tokens travel with all_to_all_single.

Outputs, input gradients, router gradients (summed over ranks) and each rank's expert gradients equal one whole
layer run on each rank's tokens, for every gate, with dropped tokens and with an expert that gets no token."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from tolerance import assert_close_scaled

from moe_cli.errors import ConfigError
from moe_cli.moe.layer import MoEMlp

CASES = {
    "topk": {"gate": "topk", "k": 2},
    "topk_capacity": {"gate": "topk", "k": 2, "capacity_factor": 0.5},  # drops tokens
    "sigmoid_topk": {"gate": "sigmoid_topk", "k": 2, "route_scale": 2.0},
    "top_p": {"gate": "top_p", "top_p": 0.6},
    "soft": {"gate": "soft"},
    "expert_choice": {"gate": "expert_choice", "capacity_factor": 1.0},
    "shared_glu": {"gate": "topk", "k": 1, "shared_experts": 1},
}
WORLD, E, D, H = 2, 4, 6, 8


def _layer(case: str) -> MoEMlp:
    torch.manual_seed(0)
    layer = MoEMlp(D, H, num_experts=E, glu=case == "shared_glu", impl="loop", **CASES[case])
    with torch.no_grad():
        layer.router.weight[E - 1] = -5.0  # inputs are positive: the last expert is never chosen (token choice)
        for p in layer.experts.parameters():
            p.normal_(0, 0.5)
    return layer


def _tokens(rank: int) -> torch.Tensor:
    return torch.rand(5 + 3 * rank, D, generator=torch.Generator().manual_seed(rank))  # uneven token counts


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for case in CASES:
            whole = _layer(case)
            losses = []
            for r in range(WORLD):  # the reference: the whole layer on every rank's tokens
                x = _tokens(r).requires_grad_()
                y = whole(x)
                losses.append((y * (r + 1)).sum())
                if r == rank:
                    ref_x, ref_y = x, y
            sum(losses).backward()

            ep = _layer(case).shard_experts(dist.group.WORLD)
            x = _tokens(rank).requires_grad_()
            y = ep(x)
            (y * (rank + 1)).sum().backward()
            router_grad = ep.router.weight.grad.clone()
            dist.all_reduce(router_grad)
            mine = slice(rank * E // WORLD, (rank + 1) * E // WORLD)
            results[case] = {
                "y": (y.detach(), ref_y.detach()), "x_grad": (x.grad, ref_x.grad),
                "router_grad": (router_grad, whole.router.weight.grad),
                **{f"expert.{n}": (p.grad, getattr(whole.experts, n).grad[mine])
                   for n, p in ep.experts.named_parameters()},
            }
        try:
            MoEMlp(D, H, num_experts=3, k=1).shard_experts(dist.group.WORLD)
            results["refused"] = None
        except ConfigError as e:
            results["refused"] = str(e)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_the_whole_layer_for_every_gate(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)}
    for rank, cases in results.items():
        assert "cannot split 3 experts evenly" in cases.pop("refused")
        for case, tensors in cases.items():
            for name, (got, want) in tensors.items():
                assert got is not None and want is not None, f"rank {rank} {case} {name}: no gradient"
                try:
                    assert_close_scaled(got, want)
                except AssertionError as e:
                    raise AssertionError(f"rank {rank} {case} {name}: {e}") from None
    # the last expert got no token (token-choice gates): its gradients are zero, yet present
    w1 = results[1]["topk"]["expert.w1"][0]
    assert w1[-1].abs().max() == 0 and w1[0].abs().max() > 0

