"""Expert parallelism (EP): a layer's experts split over the ranks of a process group, tokens sent to the ranks
that own their experts and back with ``all_to_all_single``.

Each of the P ranks of the group holds E / P consecutive experts (rank p: experts p*E/P ... (p+1)*E/P - 1) and the
whole router, so routing is computed where the tokens are, as without EP. A layer's forward then:

1. sorts its (token, slot) pairs by expert (so by owning rank), dropped slots aside;
2. swaps the per-expert counts with the other ranks (one small ``all_to_all_single`` and one host read: the split
   sizes of the exchange are host integers), then the rows themselves (autograd-aware ``all_to_all_single``: the
   backward sends the gradients back the same way);
3. runs the local experts on the rows it received with the layer's ordinary dispatcher (grouped by local expert
   and back, combine weight 1);
4. sends the outputs back and combines them per token with the routing weights, as every dispatcher does.

An expert that receives no token from any rank runs on zero rows. The parameter gradients of the local experts
come out summed over the group's token sources; the trainer averages them over the data-parallel replicas
(:mod:`moe_cli.train.parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe_cli.moe.dispatch import Dispatcher, combine_sorted, gather_sorted, sort_dropped_first
from moe_cli.moe.routing import Routing


@dataclass(frozen=True)
class ExpertShard:
    """Which of a layer's experts this rank holds: ``size`` ranks of ``group`` split ``num_experts`` evenly."""

    group: dist.ProcessGroup
    rank: int  # this process's index in the group
    size: int
    num_experts: int  # all experts of the layer

    @property
    def local(self) -> int:
        return self.num_experts // self.size

    @property
    def experts(self) -> range:
        """The global indices of this rank's experts."""
        return range(self.rank * self.local, (self.rank + 1) * self.local)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


def expert_parallel(x_TD: torch.Tensor, routing: Routing, experts, shard: ExpertShard,
                    local: Dispatcher) -> torch.Tensor:
    """y[t] = sum_s weight[t, s] * f_{expert[t, s]}(x[t]) with the experts spread over ``shard``'s group; ``experts``
    holds this rank's experts, ``local`` groups the rows they receive."""
    P, L = shard.size, shard.local
    counts, order = sort_dropped_first(routing.expert, shard.num_experts)  # by expert, so by owning rank
    received = torch.empty_like(counts[1:])  # (P * L,) rows of each of my experts, from each source rank
    dist.all_to_all_single(received, counts[1:].contiguous(), group=shard.group)
    sizes = torch.cat([counts, received]).tolist()  # the host read of the layer
    dropped, send, recv = sizes[0], sizes[1:1 + P * L], sizes[1 + P * L:]
    in_splits = [sum(send[p * L:(p + 1) * L]) for p in range(P)]
    out_splits = [sum(recv[p * L:(p + 1) * L]) for p in range(P)]

    x_in = _exchange(gather_sorted(x_TD, order, dropped, routing.expert.shape[1]), out_splits, in_splits,
                     shard.group)
    # received rows come source rank by source rank, each sorted by local expert: run them through the local
    # dispatcher as one slot per row with weight 1 (it groups them by expert and puts them back in this order)
    local_expert = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(P),
                                           torch.tensor(recv, device=x_TD.device), output_size=sum(recv))
    x_RD, plan = local.dispatch(x_in, local_expert[:, None], experts)
    y_in = local.combine(experts(x_RD, plan), plan, torch.ones(len(local_expert), 1, device=x_TD.device))
    return combine_sorted(_exchange(y_in, in_splits, out_splits, shard.group), order, dropped, routing.weight)
