"""Scattered grouped GEMMs in Triton, in the spirit of ScatterMoE: the gather of tokens is fused into the first
expert GEMM and the scatter back to (token, slot) order into the second, forward and backward.

One kernel computes, for the rows ``i`` of the expert-sorted list,

    Y[y_map(i)] = X[x_map(i)] @ W[e(i)]^T (+ b[e(i)])          (x_map / y_map: an index array or the identity)

over blocks that each hold rows of one expert only (a block table built on the device, no host sync). A
second kernel computes the weight (and bias) gradients expert by expert, dW[e] = sum_i dY[y_map(i)]^T
X[x_map(i)], with no atomics, so results are deterministic. Inputs are bf16/fp16/fp32, accumulation fp32; fp32
inputs multiply as torch's own fp32 matmuls do (:func:`dot_precision`: IEEE fp32 unless TF32 is allowed).

Triton ships with the CUDA torch wheel; ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BLOCK_M = 64


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """Build the kernels on first use (so TRITON_INTERPRET set by a test before that applies)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scatter_gemm_kernel(x_ptr, s_xm, s_xk, w_ptr, s_we, s_wn, s_wk, b_ptr, s_be, s_bn, y_ptr, s_ym, s_yn,
                            x_map_ptr, y_map_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr, N, K,
                            HAS_BIAS: tl.constexpr, X_MAP: tl.constexpr, Y_MAP: tl.constexpr, DOT: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(blk_expert_ptr + pid_b)
        start = tl.load(blk_start_ptr + pid_b)
        end = tl.load(blk_end_ptr + pid_b)
        if start < end:
            rows = start + tl.arange(0, BM)
            row_ok = rows < end
            if X_MAP:
                x_rows = tl.load(x_map_ptr + rows, mask=row_ok, other=0)
            else:
                x_rows = rows
            if Y_MAP:
                y_rows = tl.load(y_map_ptr + rows, mask=row_ok, other=0)
            else:
                y_rows = rows
            cols = pid_n * BN + tl.arange(0, BN)
            col_ok = cols < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < K
                xb = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * s_xm + ks[None, :] * s_xk,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wb = tl.load(w_ptr + e.to(tl.int64) * s_we + cols[None, :] * s_wn + ks[:, None] * s_wk,
                             mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.dot(xb, wb, input_precision=DOT)
            if HAS_BIAS:
                bias = tl.load(b_ptr + e.to(tl.int64) * s_be + cols * s_bn, mask=col_ok, other=0.0)
                acc += bias[None, :].to(tl.float32)
            tl.store(y_ptr + y_rows[:, None].to(tl.int64) * s_ym + cols[None, :] * s_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def expert_wgrad_kernel(x_ptr, s_xm, s_xk, dy_ptr, s_dm, s_dn, dw_ptr, s_we, s_wn, s_wk, db_ptr, s_be, s_bn,
                            x_map_ptr, y_map_ptr, exp_start_ptr, exp_end_ptr, N, K,
                            HAS_BIAS: tl.constexpr, X_MAP: tl.constexpr, Y_MAP: tl.constexpr, DOT: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        start = tl.load(exp_start_ptr + e)
        end = tl.load(exp_end_ptr + e)
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < N
        ks = pid_k * BK + tl.arange(0, BK)
        k_ok = ks < K
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        bacc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(start, end, BM):
            rows = m0 + tl.arange(0, BM)
            row_ok = rows < end
            if X_MAP:
                x_rows = tl.load(x_map_ptr + rows, mask=row_ok, other=0)
            else:
                x_rows = rows
            if Y_MAP:
                y_rows = tl.load(y_map_ptr + rows, mask=row_ok, other=0)
            else:
                y_rows = rows
            dy = tl.load(dy_ptr + y_rows[:, None].to(tl.int64) * s_dm + cols[None, :] * s_dn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            xb = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * s_xm + ks[None, :] * s_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(tl.trans(dy), xb, input_precision=DOT)
            if HAS_BIAS:
                bacc += tl.sum(dy.to(tl.float32), axis=0)
        tl.store(dw_ptr + e.to(tl.int64) * s_we + cols[:, None] * s_wn + ks[None, :] * s_wk,
                 acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(db_ptr + e.to(tl.int64) * s_be + cols * s_bn, bacc.to(db_ptr.dtype.element_ty),
                         mask=col_ok)

    if interpreting():  # the interpreter runs one configuration (autotuning times kernels on a GPU)
        return triton, scatter_gemm_kernel, expert_wgrad_kernel
    tune = functools.partial(triton.autotune, configs=autotune_configs(triton))
    return triton, tune(key=["N", "K", "BM"])(scatter_gemm_kernel), tune(key=["N", "K", "BM"])(expert_wgrad_kernel)


# (BLOCK_N, BLOCK_K, warps, stages): ScatterMoE's ranges (BN 64-256, BK 32/64, warps 4/8, stages 3/4), cut to
# eight points so the first call of each shape compiles eight variants, not the full grid of twenty-four
TUNE = ((64, 32, 4, 3), (64, 64, 4, 4), (128, 32, 4, 4), (128, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3),
        (256, 32, 8, 3), (256, 64, 8, 4))


def autotune_configs(triton) -> list:
    """The autotuner's configurations for BLOCK_N, BLOCK_K, warps and stages (BLOCK_M comes from the block table,
    keyed on the problem shape by :func:`block_m`)."""
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages) for bn, bk, warps, stages in TUNE]


def block_m(rows: int, experts: int) -> int:
    """Rows per block of the block table, keyed on the problem shape: 128 once experts average 256 rows or more
    (fewer, fuller blocks), else 64 (less padding per expert)."""
    return 128 if rows >= 256 * experts else BLOCK_M


def dot_precision() -> str:
    """``tl.dot``'s precision for fp32 inputs, as torch's fp32 matmuls have it: ``ieee`` unless the user allowed
    TF32 (``torch.set_float32_matmul_precision("high")`` or ``"medium"``); Triton's own default is TF32. 16-bit
    inputs ignore it."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _tile_args(n: int, k: int) -> dict:
    """BN / BK for the interpreter (the GPU autotunes them)."""
    return {"BN": _blocks(n), "BK": _blocks(k)} if interpreting() else {}


@dataclass
class BlockTable:
    """Rows of the expert-sorted list, cut into blocks of at most ``block_m`` rows of one expert each."""

    expert: torch.Tensor  # (NB,) int32 expert of each block (NB is an upper bound; empty blocks have start == end)
    start: torch.Tensor  # (NB,) int32 first row
    end: torch.Tensor  # (NB,) int32 one past the last row
    expert_start: torch.Tensor  # (E,) int32 first row of each expert
    expert_end: torch.Tensor  # (E,) int32
    block_m: int = BLOCK_M


def block_table(counts: torch.Tensor, rows: int, block_m: int = BLOCK_M) -> BlockTable:
    """Device-side block table for per-expert row counts ``counts`` (E,) of ``rows`` sorted rows."""
    E = counts.shape[0]
    nb = (rows + block_m - 1) // block_m + E  # each expert adds at most one partial block
    ends = counts.cumsum(0)
    starts = ends - counts
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    b = torch.arange(nb, device=counts.device)
    e = torch.searchsorted(block_end, b, right=True).clamp(max=E - 1)
    j = b - (block_end - blocks)[e]
    start = starts[e] + j * block_m
    end = torch.minimum(start + block_m, ends[e])
    valid = b < block_end[-1]
    start = torch.where(valid, start, 0)
    end = torch.where(valid, end, 0)
    i32 = torch.int32
    return BlockTable(e.to(i32), start.to(i32), end.to(i32), starts.to(i32), ends.to(i32), block_m)


def _blocks(n: int) -> int:
    return max(16, min(64, 1 << (max(n, 1) - 1).bit_length()))


def scatter_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, table: BlockTable,
                 x_map: torch.Tensor | None, y_map: torch.Tensor | None, out_rows: int) -> torch.Tensor:
    """Y (out_rows, N), zero where no sorted row writes: Y[y_map(i)] = X[x_map(i)] @ w[e(i)]^T + b[e(i)]."""
    triton, kernel, _ = _kernels()
    N, K = w.shape[1], w.shape[2]
    y = torch.zeros(out_rows, N, device=x.device, dtype=x.dtype)
    tiles = _tile_args(N, K)

    def grid(meta):
        return table.expert.shape[0], triton.cdiv(N, meta["BN"])

    dummy = table.start
    bb = b if b is not None else w
    kernel[grid](x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1), w.stride(2),
                 bb, bb.stride(0), bb.stride(-1), y, y.stride(0), y.stride(1),
                 x_map if x_map is not None else dummy, y_map if y_map is not None else dummy,
                 table.expert, table.start, table.end, N, K,
                 HAS_BIAS=b is not None, X_MAP=x_map is not None, Y_MAP=y_map is not None, DOT=dot_precision(),
                 BM=table.block_m, **tiles)
    return y


def expert_wgrad(x: torch.Tensor, dy: torch.Tensor, table: BlockTable, x_map, y_map, has_bias: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW (E, N, K) = per expert sum dY[y_map(i)]^T X[x_map(i)]; dB (E, N) = per expert sum dY[y_map(i)]."""
    triton, _, kernel = _kernels()
    E = table.expert_start.shape[0]
    N, K = dy.shape[1], x.shape[1]
    dw = torch.empty(E, N, K, device=x.device, dtype=dtype)
    db = torch.empty(E, N, device=x.device, dtype=dtype) if has_bias else None
    tiles = _tile_args(N, K)
    dummy = table.start
    dbb = db if db is not None else dw

    def grid(meta):
        return E, triton.cdiv(N, meta["BN"]), triton.cdiv(K, meta["BK"])

    kernel[grid](
        x, x.stride(0), x.stride(1), dy, dy.stride(0), dy.stride(1), dw, dw.stride(0), dw.stride(1), dw.stride(2),
        dbb, dbb.stride(0), dbb.stride(-1), x_map if x_map is not None else dummy,
        y_map if y_map is not None else dummy, table.expert_start, table.expert_end, N, K,
        HAS_BIAS=has_bias, X_MAP=x_map is not None, Y_MAP=y_map is not None, DOT=dot_precision(), BM=table.block_m,
        **tiles)
    return dw, db


class ScatterLinear(torch.autograd.Function):
    """Y[y_map(i)] = X[x_map(i)] @ W[e(i)]^T + b[e(i)] with its backward (dX through the same kernel on W^T with the
    maps swapped; dW, db per expert)."""

    @staticmethod
    def forward(ctx, x, w, b, table, x_map, y_map, out_rows, x_rows_grad):
        ctx.save_for_backward(x, w, x_map, y_map)
        ctx.table, ctx.has_bias, ctx.x_rows = table, b is not None, x.shape[0]
        ctx.x_rows_grad = x_rows_grad  # (slot map, slots) when x rows are gathered more than once
        return scatter_gemm(x, w, b, table, x_map, y_map, out_rows)

    @staticmethod
    def backward(ctx, dy):
        x, w, x_map, y_map = ctx.saved_tensors
        dy = dy.contiguous()
        dx = db = dw = None
        if ctx.needs_input_grad[0]:
            wt = w.transpose(1, 2)  # (E, K, N): dX rows = dY rows @ W[e]
            if x_map is None:  # x rows are the sorted rows themselves
                dx = scatter_gemm(dy, wt, None, ctx.table, y_map, None, ctx.x_rows)
            else:  # a token feeds several sorted rows: one row per slot, then a sum over the slots (no atomics)
                slot_map, slots = ctx.x_rows_grad
                dx_slots = scatter_gemm(dy, wt, None, ctx.table, y_map, slot_map, ctx.x_rows * slots)
                dx = dx_slots.view(ctx.x_rows, slots, -1).sum(1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = expert_wgrad(x, dy, ctx.table, x_map, y_map, ctx.has_bias, w.dtype)
        return dx, dw, db, None, None, None, None, None


def scatter_linear(x, w, b, table, x_map=None, y_map=None, out_rows=None, x_rows_grad=None):
    out_rows = x.shape[0] if out_rows is None else out_rows
    return ScatterLinear.apply(x, w, b, table, x_map, y_map, out_rows, x_rows_grad)
