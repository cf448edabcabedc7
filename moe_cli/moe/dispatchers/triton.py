"""The Triton dispatcher: ScatterMoE-style kernels (:mod:`moe_cli.moe.triton_gemm`). The token gather is fused
into the first expert GEMM and the scatter back to (token, slot) order into the second; no host
synchronisation, no atomics. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``impl: auto`` picks it on CUDA once a one-time self-check on a tiny problem agreed with the loop dispatcher
(:func:`triton_ready`); otherwise it warns and ``auto`` moves on to the next dispatcher."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from moe_cli.moe.dispatch import Dispatcher, GroupedOps, compute_dtype, sort_dropped_last, weighted_sum
from moe_cli.moe.routing import Routing


@dataclass(frozen=True)
class TritonPlan(GroupedOps):
    counts: torch.Tensor  # (E + 1,), index 0 = dropped
    table: object  # moe_cli.moe.triton_gemm.BlockTable over the T*S sorted rows
    row_token: torch.Tensor  # (T*S,) token of each sorted row
    order: torch.Tensor  # (T*S,) slot index of each sorted row
    slots: int  # S
    dtype: torch.dtype

    def linear(self, x_RI, w_EOI, b_EO, first):
        from moe_cli.moe.triton_gemm import scatter_linear

        rows = self.order.shape[0]
        w, b = w_EOI.to(self.dtype), b_EO.to(self.dtype) if b_EO is not None else None
        if first:  # x holds the tokens: gather each sorted row's token inside the GEMM
            return scatter_linear(x_RI.to(self.dtype), w, b, self.table, x_map=self.row_token, out_rows=rows,
                                  x_rows_grad=(self.order, self.slots))
        return scatter_linear(x_RI.to(self.dtype), w, b, self.table, y_map=self.order, out_rows=rows)

    def scale_shift(self, h_RH, w_EH, b_EH):
        ends = self.table.expert_end.long()  # expert of each sorted row (E for the unused dropped rows)
        row_expert = torch.searchsorted(ends, torch.arange(h_RH.shape[0], device=h_RH.device), right=True)
        one_hot = torch.nn.functional.one_hot(row_expert, w_EH.shape[0] + 1)[:, :w_EH.shape[0]].to(self.dtype)
        return h_RH * (one_hot @ w_EH.to(self.dtype)) + one_hot @ b_EH.to(self.dtype)


class TritonDispatcher(Dispatcher):
    name = "triton"

    def supports(self, x):
        """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
        from moe_cli.moe.triton_gemm import interpreting, triton_importable

        return triton_importable() and (x.is_cuda or (interpreting() and x.device.type == "cpu"))

    def preferred(self, x, experts):
        return x.is_cuda and triton_ready(x.device)

    def dispatch(self, x_TD, expert_TS, experts):
        from moe_cli.moe.triton_gemm import block_m, block_table

        T, S = expert_TS.shape
        E = experts.num_experts
        counts, _, order = sort_dropped_last(expert_TS, E)  # dropped slots sort last, unused
        table = block_table(counts[1:], T * S, block_m(T * S, E))
        row_token = torch.div(order, S, rounding_mode="floor")
        return x_TD, TritonPlan(counts, table, row_token, order, S, compute_dtype(x_TD))

    def combine(self, y_RO, plan, weight_TS):
        return weighted_sum(y_RO, weight_TS)  # the second GEMM already wrote slot order


def triton_ready(device: torch.device) -> bool:
    return _triton_ready(str(device))


@functools.cache
def _triton_ready(device: str) -> bool:
    """Whether the Triton path compiles and matches the loop on this device (checked once, on a tiny problem)."""
    from moe_cli.moe.dispatchers.loop import LoopDispatcher
    from moe_cli.moe.experts import Experts

    dev = torch.device(device)
    probe = torch.empty(0, device=dev)
    triton = TritonDispatcher()
    if not triton.supports(probe):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        experts = Experts(4, 32, 64, 32).to(dev)
        x = torch.randn(37, 32, generator=gen).to(dev)
        expert = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(37)]).to(dev)
        weight = torch.rand(37, 2, generator=gen).to(dev)
        r = Routing(expert, weight, probe, probe)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            got = triton(x, r, experts)[0].float()
            want = LoopDispatcher()(x, r, experts)[0].float()
        ok = bool(torch.allclose(got, want, rtol=0.05, atol=0.05))
        if not ok:
            warnings.warn("moe-cli: the Triton MoE kernels disagree with the reference on this device; impl auto "
                          "uses grouped GEMMs instead", RuntimeWarning, stacklevel=2)
        return ok
    except Exception as e:  # a Triton or driver that cannot build the kernels
        warnings.warn(f"moe-cli: the Triton MoE kernels do not run on this device ({type(e).__name__}: {e}); "
                      "impl auto uses grouped GEMMs instead", RuntimeWarning, stacklevel=2)
        return False
