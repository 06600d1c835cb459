"""log_softmax and softmax over the class dim of the canonical form, forward and backward.

Each kernel makes two passes over a row: a reduction (online log-sum-exp forward; ``Σ grad`` or
``Σ grad·out`` backward), then the elementwise map that writes the contiguous output. For rows
of up to a few thousand classes the second read comes from cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    NO_SPECIALIZE,
    check_device,
    col_offsets,
    finish_logsum,
    launch,
    plan,
    row_lse,
    tile_rows,
    tl_acc,
    to_output,
)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _softmax_fwd_kernel(
    # pointers
    x_ptr,
    out_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); out is contiguous (outer, C, inner)
    stride_xo,
    stride_xc,
    stride_xi,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    LOG: tl.constexpr,
):
    o, i, _r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    x_row = o * stride_xo + i * stride_xi
    m, s = row_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC, BLOCK_R, BLOCK_C, COL_I64)
    logsum = finish_logsum(m, s)
    inv_sum = tl.where(logsum == logsum, 1.0 / (1.0 + s), float("nan"))  # Σ = 1 + s

    out_row = o * num_classes * inner + i
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
        cols, out_offs = col_offsets(c0, inner, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
        # torch's order: (x - m) - log Σ, exact under a large common offset (unlike x - lse), and
        # exp(x - m) / Σ, whose relative error does not grow with |log p|. A row with a NaN
        # log-sum is NaN everywhere either way.
        y = (xf - m[:, None]) - logsum[:, None] if LOG else tl.exp(xf - m[:, None]) * inv_sum[:, None]
        tl.store(out_ptr + out_row[:, None] + out_offs[None, :], to_output(y, out_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _softmax_bwd_kernel(
    # pointers
    grad_out_ptr,
    out_ptr,
    grad_in_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); grad_in is contiguous (outer, C, inner)
    stride_go,
    stride_gc,
    stride_gi,
    stride_oo,
    stride_oc,
    stride_oi,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    LOG: tl.constexpr,
    SUM: tl.constexpr,
):
    o, i, _r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    g_row = o * stride_go + i * stride_gi
    y_row = o * stride_oo + i * stride_oi

    # log_softmax: Σ_c grad_c.  softmax: Σ_c grad_c·out_c, in SUM: float64 for float32 outputs
    # (see reference.softmax_backward), then split into hi + lo float32s: g - hi is exact where
    # it cancels, and lo adds the digits.
    total = tl.zeros([BLOCK_R], SUM)
    for c0 in range(0, num_classes, BLOCK_C):
        cols, g_offs = col_offsets(c0, stride_gc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        g = tl.load(grad_out_ptr + g_row[:, None] + g_offs[None, :], mask=cmask, other=0.0).to(ACC)
        if LOG:
            total += tl.sum(g, axis=1)
        else:
            cols, y_offs = col_offsets(c0, stride_oc, BLOCK_C, COL_I64)
            y = tl.load(out_ptr + y_row[:, None] + y_offs[None, :], mask=cmask, other=0.0).to(ACC)
            total += tl.sum(g.to(SUM) * y.to(SUM), axis=1)
    hi = total.to(ACC)
    lo = (total - hi.to(SUM)).to(ACC)

    gi_row = o * num_classes * inner + i
    for c0 in range(0, num_classes, BLOCK_C):
        cols, g_offs = col_offsets(c0, stride_gc, BLOCK_C, COL_I64)
        cols, y_offs = col_offsets(c0, stride_oc, BLOCK_C, COL_I64)
        cols, gi_offs = col_offsets(c0, inner, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        g = tl.load(grad_out_ptr + g_row[:, None] + g_offs[None, :], mask=cmask, other=0.0).to(ACC)
        y = tl.load(out_ptr + y_row[:, None] + y_offs[None, :], mask=cmask, other=0.0).to(ACC)
        # log_softmax: at a -inf output the gradient is the upstream one (exp(-inf) = 0), not 0.
        grad = g - tl.exp(y) * hi[:, None] if LOG else y * ((g - hi[:, None]) - lo[:, None])
        tl.store(
            grad_in_ptr + gi_row[:, None] + gi_offs[None, :],
            to_output(grad, grad_in_ptr.dtype.element_ty),
            mask=cmask,
        )


def _forward(x: Tensor, log: bool) -> Tensor:
    check_device(x)
    outer, num_classes, inner = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    tiling = plan(
        outer, num_classes, inner, (x.stride(1), out.stride(1)), (x.stride(2), out.stride(2)),
        x.element_size(), x.device,
    )  # fmt: skip
    launch(
        _softmax_fwd_kernel, tiling.grid,
        x, out,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        x.stride(0), x.stride(1), x.stride(2),
        ACC=tl_acc(x.dtype), LOG=log,
        num_warps=tiling.num_warps, **tiling.meta(),
    )  # fmt: skip
    return out


def _backward(grad_out: Tensor, out: Tensor, log: bool) -> Tensor:
    check_device(out)
    outer, num_classes, inner = out.shape
    grad_in = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if grad_in.numel() == 0:
        return grad_in
    tiling = plan(
        outer, num_classes, inner,
        (grad_out.stride(1), out.stride(1), grad_in.stride(1)),
        (grad_out.stride(2), out.stride(2), grad_in.stride(2)),
        out.element_size(), out.device,
    )  # fmt: skip
    launch(
        _softmax_bwd_kernel, tiling.grid,
        grad_out, out, grad_in,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ACC=tl_acc(out.dtype), LOG=log,
        SUM=tl.float64 if out.dtype == torch.float32 and not log else tl_acc(out.dtype),
        num_warps=tiling.num_warps, **tiling.meta(),
    )  # fmt: skip
    return grad_in


def log_softmax_forward(x: Tensor) -> Tensor:
    return _forward(x, log=True)


def log_softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    """``grad - exp(out)·Σ_c grad``: at a -inf input the gradient is the upstream one, not 0."""
    return _backward(grad_out, out, log=True)


def softmax_forward(x: Tensor) -> Tensor:
    return _forward(x, log=False)


def softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    """``out·(grad - Σ_c grad·out)``."""
    return _backward(grad_out, out, log=False)
