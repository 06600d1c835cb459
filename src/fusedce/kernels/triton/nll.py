"""nll_loss kernels: a per-row gather forward, and a backward that writes each gradient element once.

The backward does not fill zeros and then scatter: every element of the ``(outer, C, inner)``
gradient is written once, ``-g·w[t]`` at the target's class and 0 elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._common import (
    NO_SPECIALIZE,
    acc_dtype,
    check_device,
    col_offsets,
    has_no_classes,
    launch,
    plan,
    tile_rows,
    tl_acc,
    to_output,
)

# Rows per program of the forward gather, at most.
_FWD_BLOCK = 1024


@triton.jit(do_not_specialize=[*NO_SPECIALIZE, "stride_xo", "stride_xi", "stride_to", "stride_ti", "ignore_index"])
def _nll_fwd_kernel(
    # pointers
    x_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    # strides (elements); loss is contiguous (outer, inner)
    stride_xo,
    stride_xc,
    stride_xi,
    stride_to,
    stride_ti,
    # scalars
    ignore_index,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    o, i, r, rmask = tile_rows(tl.program_id(0), n_rows, inner, 1, BLOCK_R, False)
    t = tl.load(target_ptr + o * stride_to + i * stride_ti, mask=rmask, other=0).to(tl.int64)
    kept = t != ignore_index
    in_bounds = (t >= 0) & (t < num_classes)
    bad = kept & ~in_bounds  # poisoned with NaN instead of a device-side assert
    safe = tl.where(kept & in_bounds, t, 0)
    x_t = tl.load(
        x_ptr + o * stride_xo + i * stride_xi + safe * stride_xc, mask=rmask & kept & in_bounds, other=0.0
    ).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe, mask=rmask, other=0.0).to(ACC)
        loss = -w_t * x_t
    else:
        loss = -x_t
    loss = tl.where(kept, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + r, loss, mask=rmask)


@triton.jit(do_not_specialize=[*NO_SPECIALIZE, "stride_go", "stride_gi", "stride_to", "stride_ti", "ignore_index"])
def _nll_bwd_kernel(
    # pointers
    grad_loss_ptr,
    target_ptr,
    weight_ptr,
    out_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); out is contiguous (outer, C, inner)
    stride_go,
    stride_gi,
    stride_to,
    stride_ti,
    # scalars
    ignore_index,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    o, i, _r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    t = tl.load(target_ptr + o * stride_to + i * stride_ti, mask=rmask, other=0).to(tl.int64)
    kept = t != ignore_index
    in_bounds = (t >= 0) & (t < num_classes)
    safe = tl.where(kept & in_bounds, t, 0)
    g = tl.load(grad_loss_ptr + o * stride_go + i * stride_gi, mask=rmask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        g = g * tl.load(weight_ptr + safe, mask=rmask, other=0.0).to(ACC)
    # An ignored row is exactly 0 (even for a NaN upstream gradient); an out-of-bounds one is NaN.
    fill = tl.where(kept & ~in_bounds, float("nan"), 0.0).to(ACC)
    value = tl.where(kept & in_bounds, -g, fill)

    out_row = o * num_classes * inner + i
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, inner, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        grad = tl.where(cols[None, :] == safe[:, None], value[:, None], fill[:, None])
        tl.store(out_ptr + out_row[:, None] + offs[None, :], to_output(grad, out_ptr.dtype.element_ty), mask=cmask)


def nll_forward(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    check_device(x)
    outer, num_classes, inner = x.shape
    if x.device.type == "cpu":
        # Free on the host (the interpreter); on CUDA the kernel poisons the row instead.
        reference.check_targets(target, num_classes, ignore_index)
    if has_no_classes(x):
        return reference.nll_forward(x, target, weight, ignore_index)
    loss = torch.empty(outer, inner, dtype=acc_dtype(x.dtype), device=x.device)
    rows = outer * inner
    if rows == 0:
        return loss
    block = min(triton.next_power_of_2(rows), _FWD_BLOCK)
    launch(
        _nll_fwd_kernel, triton.cdiv(rows, block),
        x, target, x if weight is None else weight, loss,
        rows, num_classes, inner,
        x.stride(0), x.stride(1), x.stride(2),
        target.stride(0), target.stride(1),
        ignore_index,
        ACC=tl_acc(x.dtype), BLOCK_R=block, HAS_WEIGHT=weight is not None,
        num_warps=4,
    )  # fmt: skip
    return loss


def nll_backward(
    grad_loss: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    num_classes: int,
    dtype: torch.dtype,
) -> Tensor:
    check_device(target)
    outer, inner = target.shape
    out = torch.empty(outer, num_classes, inner, dtype=dtype, device=target.device)
    if out.numel() == 0:
        return out
    elem = out.element_size()
    tiling = plan(outer, num_classes, inner, (out.stride(1),), (out.stride(2),), elem, out.device)
    launch(
        _nll_bwd_kernel, tiling.grid,
        grad_loss, target, out if weight is None else weight, out,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        grad_loss.stride(0), grad_loss.stride(1),
        target.stride(0), target.stride(1),
        ignore_index,
        ACC=tl_acc(dtype), HAS_WEIGHT=weight is not None,
        num_warps=tiling.num_warps, **tiling.meta(),
    )  # fmt: skip
    return out
