"""cross_entropy kernels: index targets and probability targets, forward and backward.

Forward is one streaming pass over the logits: an online log-sum-exp (plus the sums the label
smoothing and probability-target losses need) gives the per-row loss and the row stats (the max
``m`` and ``log Σ exp(x - m)``, kept apart: see ``reference.row_stats``). The losses are formed
as ``(m - x) + log Σ`` term by term, their sums relative to the running max, so that nothing
cancels under a large common offset or when the loss is small. Backward is one streaming pass
too: it reads the logits, recomputes ``p = exp((x - m) - log Σ)`` and writes the gradient, into a
fresh contiguous ``(outer, C, inner)`` tensor or into ``x`` itself when ``inplace``.
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
    finish_logsum,
    has_no_classes,
    launch,
    load_stats,
    online_lse_step,
    online_shifted_sum_step,
    plan,
    reference_max,
    row_lse,
    scalar,
    split_scalar,
    store_stats,
    tile_rows,
    tl_acc,
    to_output,
)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_index_targets(
    target_ptr,
    weight_ptr,
    o,
    i,
    rmask,
    stride_to,
    stride_ti,
    num_classes,
    ignore_index,
    ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """Per row: kept (not ignored), out of bounds, the safe class index and its weight."""
    t = tl.load(target_ptr + o * stride_to + i * stride_ti, mask=rmask, other=0).to(tl.int64)
    kept = t != ignore_index
    in_bounds = (t >= 0) & (t < num_classes)
    # An out-of-bounds target is poisoned (NaN loss and gradient) instead of asserting on device.
    bad = kept & ~in_bounds
    safe = tl.where(kept & in_bounds, t, 0)
    w_t = tl.full(t.shape, 1.0, ACC)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + safe, mask=rmask, other=0.0).to(ACC)
    return kept, bad, safe, w_t


@triton.jit
def _tanh(y):
    """``tanh(y)`` to a few ulp, from exp and log alone (the interpreter has no libdevice tanh):
    ``tanh|y| = -e/(2 + e)`` with ``e = expm1(-2|y|)``, and expm1 by Kahan's ``(u-1)·z/log u``
    (``u = exp z``), which keeps the small |y| that ``1 - exp(-2|y|)`` would cancel."""
    z = -2.0 * tl.abs(y)
    u = tl.exp(z)
    um1 = u - 1.0
    em1 = tl.where(u == 1.0, z, tl.where(um1 == -1.0, -1.0, um1 * z / tl.log(u)))
    t = -em1 / (2.0 + em1)
    return tl.where(y < 0, -t, t)


@triton.jit
def _capped(xf, softcap, HAS_SOFTCAP: tl.constexpr):
    """The soft-capped logits ``cap·tanh(x / cap)`` (``x`` itself without a cap)."""
    if HAS_SOFTCAP:
        xf = softcap * _tanh(xf / softcap)
    return xf


@triton.jit(do_not_specialize=[*NO_SPECIALIZE, "stride_to", "stride_ti", "ignore_index"])
def _ce_fwd_kernel(
    # pointers
    x_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); loss (outer, inner) and stats (outer, inner, 2) are contiguous
    stride_xo,
    stride_xc,
    stride_xi,
    stride_to,
    stride_ti,
    # scalars: ignore_index, then 1-ε and ε/C as float32 pairs (see split_scalar)
    ignore_index,
    keep_hi,
    keep_lo,
    smooth_hi,
    smooth_lo,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    # the LLM extras (see reference.ce_extras_forward): z and the cap as float32 pairs
    z_hi=0.0,
    z_lo=0.0,
    cap_hi=1.0,
    cap_lo=0.0,
    HAS_Z_LOSS: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
):
    o, i, r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    x_row = o * stride_xo + i * stride_xi
    cap = scalar(cap_hi, cap_lo, ACC)

    sum_wd = tl.zeros([BLOCK_R], ACC)  # Σ w_c·(m - x_c) (smoothing only)
    sum_w = tl.zeros([BLOCK_R], ACC)  # Σ w_c over the blocks folded so far (smoothing only)
    if HAS_SMOOTHING or HAS_SOFTCAP:
        # Block by block: the smoothing sum follows the row's running max, and the capped
        # logits' ties are found by value (see online_lse_step).
        m = tl.full([BLOCK_R], float("-inf"), ACC)
        s = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, num_classes, BLOCK_C):
            cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
            cmask = rmask[:, None] & (cols < num_classes)[None, :]
            xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
            xf = _capped(xf, cap, HAS_SOFTCAP)
            m_old = m
            m, s = online_lse_step(m, s, xf, cmask)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(ACC)
                else:
                    w = tl.where(cols < num_classes, 1.0, 0.0).to(ACC)
                sum_wd = online_shifted_sum_step(sum_wd, sum_w, m_old, m, w[None, :], xf, cmask)
                sum_w += tl.sum(w, axis=0)
    else:
        # The row statistics alone, lane by lane, as the reduced loss forms them: the two give
        # the same stats bit for bit.
        m, s = row_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC, BLOCK_R, BLOCK_C, COL_I64)
    logsum = finish_logsum(m, s)

    kept, bad, safe, w_t = _load_index_targets(
        target_ptr,
        weight_ptr,
        o,
        i,
        rmask,
        stride_to,
        stride_ti,
        num_classes,
        ignore_index,
        ACC,
        HAS_WEIGHT,
    )
    x_t = tl.load(x_ptr + x_row + safe * stride_xc, mask=rmask & kept & ~bad, other=0.0).to(ACC)
    x_t = _capped(x_t, cap, HAS_SOFTCAP)
    loss = w_t * ((m - x_t) + logsum)
    if HAS_SMOOTHING:
        smooth = sum_w * logsum + sum_wd  # Σ_c w_c·((m - x_c) + log Σ)
        loss = scalar(keep_hi, keep_lo, ACC) * loss + scalar(smooth_hi, smooth_lo, ACC) * smooth
    if HAS_Z_LOSS:
        lse = m + logsum
        loss += scalar(z_hi, z_lo, ACC) * (lse * lse)
    loss = tl.where(kept, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + r, loss, mask=rmask)
    store_stats(stats_ptr, r, reference_max(m, s), logsum, rmask)


@triton.jit(do_not_specialize=[*NO_SPECIALIZE, "stride_go", "stride_gi", "stride_to", "stride_ti", "ignore_index"])
def _ce_bwd_kernel(
    # pointers (out may be x itself: the in-place backward)
    grad_loss_ptr,
    x_ptr,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    stats_ptr,
    out_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); stats is contiguous (outer, inner, 2)
    stride_go,
    stride_gi,
    stride_xo,
    stride_xc,
    stride_xi,
    stride_to,
    stride_ti,
    stride_oo,
    stride_oc,
    stride_oi,
    # scalars: ignore_index, then 1-ε and ε/C as float32 pairs (see split_scalar)
    ignore_index,
    keep_hi,
    keep_lo,
    smooth_hi,
    smooth_lo,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    # the LLM extras (see reference.ce_extras_backward): 2z (the launcher doubles it) and the cap
    z_hi=0.0,
    z_lo=0.0,
    cap_hi=1.0,
    cap_lo=0.0,
    HAS_Z_LOSS: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
):
    o, i, r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    kept, bad, safe, w_t = _load_index_targets(
        target_ptr,
        weight_ptr,
        o,
        i,
        rmask,
        stride_to,
        stride_ti,
        num_classes,
        ignore_index,
        ACC,
        HAS_WEIGHT,
    )
    g = tl.load(grad_loss_ptr + o * stride_go + i * stride_gi, mask=rmask, other=0.0).to(ACC)
    # g = 0 on ignored rows multiplies the bracket, so a NaN row that is ignored stays NaN.
    g = tl.where(kept, g, 0.0)
    g = tl.where(bad, float("nan"), g)
    m, logsum = load_stats(stats_ptr, r, rmask)

    if HAS_SMOOTHING:
        smooth = scalar(smooth_hi, smooth_lo, ACC)
        target_coef = scalar(keep_hi, keep_lo, ACC) * w_t
        total_w = tl.load(weight_sum_ptr).to(ACC) if HAS_WEIGHT else num_classes
        prob_coef = target_coef + smooth * total_w
    else:
        target_coef = w_t
        prob_coef = w_t
    if HAS_Z_LOSS:  # ∂ z·lse² / ∂x'_c = 2z·lse·p_c
        prob_coef = prob_coef + scalar(z_hi, z_lo, ACC) * (m + logsum)
    cap = scalar(cap_hi, cap_lo, ACC)

    x_row = o * stride_xo + i * stride_xi
    out_row = o * stride_oo + i * stride_oi
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
        cols, out_offs = col_offsets(c0, stride_oc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            tanh_x = _tanh(xf / cap)
            xf = cap * tanh_x
        grad = prob_coef[:, None] * tl.exp((xf - m[:, None]) - logsum[:, None])
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(ACC)
                grad -= smooth * w[None, :]
            else:
                grad -= smooth
        grad = tl.where(cols[None, :] == safe[:, None], grad - target_coef[:, None], grad)
        grad = grad * g[:, None]
        if HAS_SOFTCAP:
            grad = grad * (1.0 - tanh_x * tanh_x)
        tl.store(
            out_ptr + out_row[:, None] + out_offs[None, :],
            to_output(grad, out_ptr.dtype.element_ty),
            mask=cmask,
        )


@triton.jit
def _smoothed_target(t, keep, smooth, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr):
    """``t' = t·(1-ε) + ε/C``, in the accumulation dtype (as the reference's ``smoothed_target``)."""
    tf = t.to(ACC)
    if HAS_SMOOTHING:
        tf = tf * keep + smooth
    return tf


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _ce_prob_fwd_kernel(
    # pointers
    x_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    stats_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); loss (outer, inner) and stats (outer, inner, 2) are contiguous
    stride_xo,
    stride_xc,
    stride_xi,
    stride_to,
    stride_tc,
    stride_ti,
    # scalars: 1-ε and ε/C as float32 pairs (see split_scalar)
    keep_hi,
    keep_lo,
    smooth_hi,
    smooth_lo,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
):
    o, i, r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    x_row = o * stride_xo + i * stride_xi
    t_row = o * stride_to + i * stride_ti
    keep = scalar(keep_hi, keep_lo, ACC)
    smooth = scalar(smooth_hi, smooth_lo, ACC)

    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    sum_wt = tl.zeros([BLOCK_R], ACC)  # S = Σ w_c·t'_c
    sum_wtd = tl.zeros([BLOCK_R], ACC)  # Σ w_c·t'_c·(m - x_c)
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
        cols, t_offs = col_offsets(c0, stride_tc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
        m_old = m
        m, s = online_lse_step(m, s, xf, cmask)
        t = tl.load(target_ptr + t_row[:, None] + t_offs[None, :], mask=cmask, other=0.0)
        wt = _smoothed_target(t, keep, smooth, HAS_SMOOTHING, ACC)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(ACC)
            wt = w[None, :] * wt
        wt = tl.where(cmask, wt, 0.0)
        # A zero target at a -inf logit gives 0·inf = NaN, as the reference's 0·((m - x) + log Σ).
        sum_wtd = online_shifted_sum_step(sum_wtd, sum_wt, m_old, m, wt, xf, cmask)
        sum_wt += tl.sum(wt, axis=1)
    logsum = finish_logsum(m, s)
    # Σ_c w_c·t'_c·((m - x_c) + log Σ): two sums of non-negative terms for non-negative targets
    # and weights, so a small loss keeps its digits (lse·S - Σ w·t'·x would cancel).
    loss = sum_wt * logsum + sum_wtd
    tl.store(loss_ptr + r, loss, mask=rmask)
    store_stats(stats_ptr, r, reference_max(m, s), logsum, rmask)


@triton.jit(do_not_specialize=[*NO_SPECIALIZE, "stride_go", "stride_gi"])
def _ce_prob_bwd_kernel(
    # pointers (out may be x itself: the in-place backward)
    grad_loss_ptr,
    x_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    out_ptr,
    # shapes
    n_rows,
    num_classes,
    inner,
    inner_tiles,
    # strides (elements); stats is contiguous (outer, inner, 2)
    stride_go,
    stride_gi,
    stride_xo,
    stride_xc,
    stride_xi,
    stride_to,
    stride_tc,
    stride_ti,
    stride_oo,
    stride_oc,
    stride_oi,
    # scalars: 1-ε and ε/C as float32 pairs (see split_scalar)
    keep_hi,
    keep_lo,
    smooth_hi,
    smooth_lo,
    # meta
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INNER_TILE: tl.constexpr,
    COL_I64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
):
    o, i, r, rmask = tile_rows(tl.program_id(0), n_rows, inner, inner_tiles, BLOCK_R, INNER_TILE)
    x_row = o * stride_xo + i * stride_xi
    t_row = o * stride_to + i * stride_ti
    out_row = o * stride_oo + i * stride_oi
    keep = scalar(keep_hi, keep_lo, ACC)
    smooth = scalar(smooth_hi, smooth_lo, ACC)
    g = tl.load(grad_loss_ptr + o * stride_go + i * stride_gi, mask=rmask, other=0.0).to(ACC)
    m, logsum = load_stats(stats_ptr, r, rmask)

    # First pass, over the targets only: S = Σ w_c·t'_c.
    sum_wt = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, num_classes, BLOCK_C):
        cols, t_offs = col_offsets(c0, stride_tc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        t = tl.load(target_ptr + t_row[:, None] + t_offs[None, :], mask=cmask, other=0.0)
        wt = _smoothed_target(t, keep, smooth, HAS_SMOOTHING, ACC)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(ACC)
            wt = w[None, :] * wt
        sum_wt += tl.sum(tl.where(cmask, wt, 0.0), axis=1)

    # Second pass: grad_c = g·(S·p_c - w_c·t'_c), one read of x and one write of the gradient.
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
        cols, t_offs = col_offsets(c0, stride_tc, BLOCK_C, COL_I64)
        cols, out_offs = col_offsets(c0, stride_oc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
        t = tl.load(target_ptr + t_row[:, None] + t_offs[None, :], mask=cmask, other=0.0)
        wt = _smoothed_target(t, keep, smooth, HAS_SMOOTHING, ACC)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(ACC)
            wt = w[None, :] * wt
        grad = (sum_wt[:, None] * tl.exp((xf - m[:, None]) - logsum[:, None]) - wt) * g[:, None]
        tl.store(
            out_ptr + out_row[:, None] + out_offs[None, :],
            to_output(grad, out_ptr.dtype.element_ty),
            mask=cmask,
        )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _coefficients(smoothing: float, num_classes: int) -> tuple[bool, float, float, float, float]:
    """Whether smoothing is on, and 1-ε and ε/C as float32 pairs."""
    has_smoothing = smoothing > 0
    eps = smoothing if has_smoothing else 0.0
    keep_hi, keep_lo = split_scalar(1.0 - eps)
    smooth_hi, smooth_lo = split_scalar(eps / num_classes if num_classes else 0.0)
    return has_smoothing, keep_hi, keep_lo, smooth_hi, smooth_lo


def _per_row_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    """The per-row loss and the ``(outer, inner, 2)`` row stats, in the accumulation dtype."""
    outer, _, inner = x.shape
    acc = acc_dtype(x.dtype)
    loss = torch.empty(outer, inner, dtype=acc, device=x.device)
    return loss, torch.empty(outer, inner, 2, dtype=acc, device=x.device)


def _saved_stats(stats: Tensor, x: Tensor) -> Tensor:
    """The row stats as the backward kernels read them: contiguous, in the accumulation dtype.
    The forward's own stats already are; the checks cost less than two no-op torch calls."""
    acc = acc_dtype(x.dtype)
    if stats.dtype == acc and stats.is_contiguous():
        return stats
    return stats.to(acc).contiguous()


def _gradient_buffer(x: Tensor, inplace: bool) -> Tensor:
    return x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _extras_meta(z_coef: float, softcap: float) -> dict[str, float | bool]:
    """The kernels' extras arguments (none of them for the defaults, which then compile and run
    exactly as before): a z-loss coefficient and the cap, as float32 pairs, and their flags."""
    if not z_coef and not softcap:
        return {}
    z_hi, z_lo = split_scalar(z_coef)
    cap_hi, cap_lo = split_scalar(softcap if softcap else 1.0)
    return {"cap_hi": cap_hi, "cap_lo": cap_lo, "HAS_Z_LOSS": bool(z_coef), "HAS_SOFTCAP": bool(softcap),
            "z_lo": z_lo, "z_hi": z_hi}


def ce_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    check_device(x)
    outer, num_classes, inner = x.shape
    if x.device.type == "cpu":
        # Free on the host (the interpreter); on CUDA the kernel poisons the row instead.
        reference.check_targets(target, num_classes, ignore_index)
    if has_no_classes(x):
        return reference.ce_forward(x, target, weight, ignore_index, smoothing)
    loss, stats = _per_row_outputs(x)
    if loss.numel() == 0:
        return loss, stats
    tiling = plan(outer, num_classes, inner, (x.stride(1),), (x.stride(2),), x.element_size(), x.device)
    has_smoothing, keep_hi, keep_lo, smooth_hi, smooth_lo = _coefficients(smoothing, num_classes)
    launch(
        _ce_fwd_kernel, tiling.grid,
        x, target, x if weight is None else weight, loss, stats,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        x.stride(0), x.stride(1), x.stride(2),
        target.stride(0), target.stride(1),
        ignore_index, keep_hi, keep_lo, smooth_hi, smooth_lo,
        ACC=tl_acc(x.dtype), HAS_WEIGHT=weight is not None, HAS_SMOOTHING=has_smoothing,
        num_warps=tiling.num_warps, **tiling.meta(), **_extras_meta(z_loss, softcap),
    )  # fmt: skip
    return loss, stats


def ce_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    inplace: bool,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> Tensor:
    check_device(x)
    outer, num_classes, inner = x.shape
    out = _gradient_buffer(x, inplace)
    if x.numel() == 0:
        return out
    stats = _saved_stats(stats, x)
    tiling = plan(
        outer,
        num_classes,
        inner,
        (x.stride(1), out.stride(1)),
        (x.stride(2), out.stride(2)),
        x.element_size(),
        x.device,
    )
    has_smoothing, keep_hi, keep_lo, smooth_hi, smooth_lo = _coefficients(smoothing, num_classes)
    # W = Σ_c w_c for the smoothing term: a tiny reduction in torch, no host sync.
    weight_sum = weight.to(stats.dtype).sum() if weight is not None and has_smoothing else stats
    launch(
        _ce_bwd_kernel, tiling.grid,
        grad_loss, x, target, x if weight is None else weight, weight_sum, stats, out,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        grad_loss.stride(0), grad_loss.stride(1),
        x.stride(0), x.stride(1), x.stride(2),
        target.stride(0), target.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        ignore_index, keep_hi, keep_lo, smooth_hi, smooth_lo,
        ACC=tl_acc(x.dtype), HAS_WEIGHT=weight is not None, HAS_SMOOTHING=has_smoothing,
        num_warps=tiling.num_warps, **tiling.meta(), **_extras_meta(2 * z_loss, softcap),
    )  # fmt: skip
    return out


def ce_extras_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[Tensor, Tensor]:
    """``reference.ce_extras_forward``: ce_forward's kernel with the z-loss and cap compiled in."""
    return ce_forward(x, target, weight, ignore_index, smoothing, z_loss, softcap)


def ce_extras_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float,
    inplace: bool,
) -> Tensor:
    """``reference.ce_extras_backward``: ce_backward's kernel with the z-loss and cap compiled in."""
    return ce_backward(grad_loss, x, target, weight, stats, ignore_index, smoothing, inplace, z_loss, softcap)


def ce_prob_forward(x: Tensor, target: Tensor, weight: Tensor | None, smoothing: float) -> tuple[Tensor, Tensor]:
    check_device(x)
    outer, num_classes, inner = x.shape
    loss, stats = _per_row_outputs(x)
    if loss.numel() == 0:
        return loss, stats
    if num_classes == 0:  # as the reference: no max, the log of an empty sum, an empty loss sum
        return loss.zero_(), stats.fill_(float("-inf"))
    tiling = plan(
        outer,
        num_classes,
        inner,
        (x.stride(1), target.stride(1)),
        (x.stride(2), target.stride(2)),
        x.element_size(),
        x.device,
    )
    has_smoothing, keep_hi, keep_lo, smooth_hi, smooth_lo = _coefficients(smoothing, num_classes)
    launch(
        _ce_prob_fwd_kernel, tiling.grid,
        x, target, x if weight is None else weight, loss, stats,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        x.stride(0), x.stride(1), x.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        keep_hi, keep_lo, smooth_hi, smooth_lo,
        ACC=tl_acc(x.dtype), HAS_WEIGHT=weight is not None, HAS_SMOOTHING=has_smoothing,
        num_warps=tiling.num_warps, **tiling.meta(),
    )  # fmt: skip
    return loss, stats


def ce_prob_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    smoothing: float,
    inplace: bool,
) -> Tensor:
    check_device(x)
    outer, num_classes, inner = x.shape
    out = _gradient_buffer(x, inplace)
    if x.numel() == 0:
        return out
    stats = _saved_stats(stats, x)
    tiling = plan(
        outer, num_classes, inner,
        (x.stride(1), target.stride(1), out.stride(1)), (x.stride(2), target.stride(2), out.stride(2)),
        x.element_size(), x.device,
    )  # fmt: skip
    has_smoothing, keep_hi, keep_lo, smooth_hi, smooth_lo = _coefficients(smoothing, num_classes)
    launch(
        _ce_prob_bwd_kernel, tiling.grid,
        grad_loss, x, target, x if weight is None else weight, stats, out,
        outer * inner, num_classes, inner, tiling.inner_tiles,
        grad_loss.stride(0), grad_loss.stride(1),
        x.stride(0), x.stride(1), x.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        keep_hi, keep_lo, smooth_hi, smooth_lo,
        ACC=tl_acc(x.dtype), HAS_WEIGHT=weight is not None, HAS_SMOOTHING=has_smoothing,
        num_warps=tiling.num_warps, **tiling.meta(),
    )  # fmt: skip
    return out


# The gradients with respect to the probability targets and the class weights are rare N×C
# paths (soft targets that require grad, a learnable weight): the reference's torch ops serve.
ce_prob_target_grad = reference.ce_prob_target_grad
ce_prob_weight_grad = reference.ce_prob_weight_grad
