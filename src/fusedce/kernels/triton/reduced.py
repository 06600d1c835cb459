"""The plain (N, C) 'mean'/'sum' cross-entropy in one launch each way (functional's fast path).

``_ops`` composes ``ce_reduced_forward``/``ce_reduced_backward`` from ``ce_forward``/``ce_backward``
plus the reduction's torch ops for a backend that lacks them. On a GPU each of those small ops
costs more host time than the loss's whole kernel for an ImageNet-sized input, so this backend
fuses them: the forward kernel also reduces, and the backward kernel reads the upstream gradient
and the denominator from device memory. Per call, the only torch ops are the output allocations.

The values are the composite's (see ``_ops._ce_reduced_forward``): the same per-row arithmetic
as ``cross_entropy._ce_fwd_kernel`` without weight or smoothing, the rows' sum, ``'mean'``'s count
of non-ignored rows (0/0 = NaN when there is none) and one division in the accumulation dtype,
rounded to the input's dtype. The sum is formed deterministically: each program writes its
partial sum (float64) and count to a buffer, then draws a ticket from a counter; the program that
draws the last ticket adds the partials in a fixed order, writes the results and resets the counter
to 0. No float atomics, so the same input gives the same bits every run. The float64 sum of the
float32 row losses is at least as accurate as torch's float32 sum (the checker compares both
against a float64 truth).
"""

from __future__ import annotations

import functools
import threading
from types import ModuleType

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import _common
from ._common import (
    Tiling,
    acc_dtype,
    check_device,
    col_offsets,
    finish_logsum,
    launch,
    load_stats,
    plan,
    reference_max,
    row_lse,
    store_stats,
    tile_rows,
    tl_acc,
    to_output,
)

# The kernels do not specialise on the row count, the target stride or ignore_index (each value
# would be one more compilation); _common.NO_SPECIALIZE's other name is no argument of theirs.

# Partials the last program folds per step (a power of two); 8192 programs take 8 steps.
_BLOCK_P = 1024


@triton.jit
def _divide(total, denominator, ACC: tl.constexpr):
    """``total / denominator`` rounded to nearest, as torch divides: Triton's float32 ``/`` is an
    approximate division on the GPU (``div.full.f32``), so float32 takes ``div_rn``."""
    if ACC == tl.float64:  # noqa: SIM300 - a constexpr dtype, compared at compile time
        return total / denominator
    else:
        return tl.math.div_rn(total, denominator)


@triton.jit(do_not_specialize=["n_rows", "stride_t", "ignore_index"])
def _ce_reduced_fwd_kernel(
    # pointers: loss and denominator are 0-d; stats (N, 1, 2) and partials (programs, 2) contiguous
    x_ptr,
    target_ptr,
    stats_ptr,
    loss_ptr,
    denominator_ptr,
    partials_ptr,
    counter_ptr,
    n_rows,
    num_classes,
    stride_xo,
    stride_xc,
    stride_t,
    ignore_index,
    ACC: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COL_I64: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    # (N, C) is (N, C, 1) in the canonical form: inner = 1, the flat-row tiling.
    o, _i, r, rmask = tile_rows(pid, n_rows, 1, 1, BLOCK_R, False)
    x_row = o * stride_xo

    # The row loss exactly as _ce_fwd_kernel forms it without weight and smoothing.
    m, s = row_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC, BLOCK_R, BLOCK_C, COL_I64)
    logsum = finish_logsum(m, s)
    t = tl.load(target_ptr + o * stride_t, mask=rmask, other=0).to(tl.int64)
    kept = rmask & (t != ignore_index)
    # An out-of-bounds target is poisoned (NaN loss, hence a NaN total) instead of asserting.
    bad = kept & ((t < 0) | (t >= num_classes))
    safe = tl.where(kept & ~bad, t, 0)
    x_t = tl.load(x_ptr + x_row + safe * stride_xc, mask=kept & ~bad, other=0.0).to(ACC)
    loss = (m - x_t) + logsum
    loss = tl.where(kept, loss, 0.0)  # also 0 on the tile's rows past N (their m is -inf)
    loss = tl.where(bad, float("nan"), loss)
    store_stats(stats_ptr, r, reference_max(m, s), logsum, rmask)

    # This program's partial sum and count, then its ticket. The barrier orders every thread's
    # store before the (acquire-release, GPU-scope) atomic, as in Triton's layer-norm tutorial.
    tl.store(partials_ptr + 2 * pid, tl.sum(loss.to(tl.float64), axis=0))
    tl.store(partials_ptr + 2 * pid + 1, tl.sum(tl.where(kept, 1.0, 0.0).to(tl.float64), axis=0))
    tl.debug_barrier()
    num_programs = tl.num_programs(0)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        # Every other program has stored its partials: fold them in a fixed order. ".cg" reads
        # from L2, past this SM's L1, where the other programs' stores are visible.
        total_v = tl.zeros([BLOCK_P], tl.float64)
        count_v = tl.zeros([BLOCK_P], tl.float64)
        for p0 in range(0, num_programs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = p < num_programs
            total_v += tl.load(partials_ptr + 2 * p, mask=pmask, other=0.0, cache_modifier=".cg")
            count_v += tl.load(partials_ptr + 2 * p + 1, mask=pmask, other=0.0, cache_modifier=".cg")
        total = tl.sum(total_v, axis=0).to(ACC)
        if MEAN:  # noqa: SIM108 - a constexpr branch (no ternary in older Triton's jit)
            denominator = tl.sum(count_v, axis=0).to(ACC)  # the count, exact in float64
        else:
            denominator = tl.cast(1.0, ACC)
        tl.store(loss_ptr, to_output(_divide(total, denominator, ACC), loss_ptr.dtype.element_ty))
        tl.store(denominator_ptr, denominator)
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch on this stream


@triton.jit(do_not_specialize=["n_rows", "stride_t", "ignore_index"])
def _ce_reduced_bwd_kernel(
    # pointers: grad_out and denominator are 0-d; stats (N, 1, 2) and out (N, C) contiguous
    grad_out_ptr,
    denominator_ptr,
    x_ptr,
    target_ptr,
    stats_ptr,
    out_ptr,
    n_rows,
    num_classes,
    stride_xo,
    stride_xc,
    stride_t,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COL_I64: tl.constexpr,
):
    o, _i, r, rmask = tile_rows(tl.program_id(0), n_rows, 1, 1, BLOCK_R, False)
    t = tl.load(target_ptr + o * stride_t, mask=rmask, other=0).to(tl.int64)
    kept = t != ignore_index
    bad = kept & ((t < 0) | (t >= num_classes))
    safe = tl.where(kept & ~bad, t, 0)
    # The composite's grad_out.to(denominator.dtype) / denominator, once per program.
    g_all = _divide(tl.load(grad_out_ptr).to(ACC), tl.load(denominator_ptr), ACC)
    g = tl.where(kept, g_all, 0.0)
    g = tl.where(bad, float("nan"), g)
    m, logsum = load_stats(stats_ptr, r, rmask)

    # As _ce_bwd_kernel without weight and smoothing (its coefficients are 1 there).
    x_row = o * stride_xo
    out_row = o * num_classes
    for c0 in range(0, num_classes, BLOCK_C):
        cols, offs = col_offsets(c0, stride_xc, BLOCK_C, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        xf = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=0.0).to(ACC)
        grad = tl.exp((xf - m[:, None]) - logsum[:, None])
        grad = tl.where(cols[None, :] == safe[:, None], grad - 1.0, grad)
        grad = grad * g[:, None]
        tl.store(out_ptr + out_row[:, None] + cols[None, :], to_output(grad, out_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _tiling(
    rows: int,
    num_classes: int,
    class_strides: tuple[int, ...],
    itemsize: int,
    device_type: str,
    max_block_c: int | None,
) -> Tiling:
    """``plan`` for an (N, C, 1) launch, once per shape: it is a pure function of these (the
    ``MAX_BLOCK_C`` test knob included in the key)."""
    del max_block_c  # read by plan from _common; only part of the key here
    return plan(rows, num_classes, 1, class_strides, (1,) * len(class_strides), itemsize, torch.device(device_type))


# The ticket counters, one per (device, stream), created zeroed once; every launch leaves its
# counter at 0. Launches on one stream run in order, so they can share one; launches on two
# streams may overlap, so each stream has its own (torch's streams come from a fixed pool, so the
# dict stays small). On the host (the interpreter runs the programs in the calling thread) each
# thread has its own.
_counters: dict[tuple[int, int], Tensor] = {}
_host_counters = threading.local()


def _counter(x: Tensor) -> Tensor:
    if x.device.type != "cuda":
        counter = getattr(_host_counters, "counter", None)
        if counter is None:
            counter = _host_counters.counter = torch.zeros(1, dtype=torch.int32)
        return counter
    if torch.cuda.is_current_stream_capturing():
        # A CUDA graph: a cached counter's zeros would not be part of the graph, and a replay may
        # overlap the eager launches on that stream. The graph gets its own, zeroed in the graph.
        return torch.zeros(1, dtype=torch.int32, device=x.device)
    index = x.get_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    counter = _counters.get(key)
    if counter is None:
        # Allocated on (hence owned by) the current stream, zeroed in stream order before use.
        counter = _counters.setdefault(key, torch.zeros(1, dtype=torch.int32, device=x.device))
    return counter


def _degenerate(x: Tensor) -> bool:
    """No rows or no classes: nothing to launch over; the composite handles these edges."""
    return x.shape[0] == 0 or x.shape[1] == 0


def ce_reduced_forward(x: Tensor, target: Tensor, ignore_index: int, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The scalar 'mean' (or 'sum') loss of an (N, C) input, its (N, 1, 2) row stats (those of
    ``ce_forward``) and the denominator, in one launch (see the module docstring)."""
    check_device(x)
    if x.dim() != 2 or target.dim() != 1 or target.dtype != torch.int64:
        raise ValueError("fusedce: the reduced cross_entropy takes (N, C) logits and (N,) int64 targets")
    rows, num_classes = x.shape
    if x.device.type == "cpu":
        # Free on the host (the interpreter); on CUDA the kernel poisons the row instead.
        reference.check_targets(target, num_classes, ignore_index)
    if _degenerate(x):
        from ..._ops import _ce_reduced_forward  # the composite (deferred: _ops imports the backends)

        return _ce_reduced_forward(_backend(), x, target, ignore_index, mean)
    acc = acc_dtype(x.dtype)
    tiling = _tiling(rows, num_classes, (x.stride(1),), x.element_size(), x.device.type, _common.MAX_BLOCK_C)
    stats = torch.empty(rows, 1, 2, dtype=acc, device=x.device)
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    denominator = torch.empty((), dtype=acc, device=x.device)
    partials = torch.empty(tiling.grid, 2, dtype=torch.float64, device=x.device)
    launch(
        _ce_reduced_fwd_kernel, tiling.grid,
        x, target, stats, loss, denominator, partials, _counter(x),
        rows, num_classes, x.stride(0), x.stride(1), target.stride(0), ignore_index,
        ACC=tl_acc(x.dtype), MEAN=mean, BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c,
        COL_I64=tiling.col_i64, BLOCK_P=_BLOCK_P, num_warps=tiling.num_warps,
    )  # fmt: skip
    return loss, stats, denominator


def ce_reduced_backward(
    grad_out: Tensor, x: Tensor, target: Tensor, lse: Tensor, denominator: Tensor, ignore_index: int
) -> Tensor:
    """The gradient of ``ce_reduced_forward``'s loss with respect to x, in one launch: every
    row's upstream gradient is ``grad_out / denominator`` in the accumulation dtype."""
    check_device(x)
    if x.dim() != 2 or target.dim() != 1 or target.dtype != torch.int64:
        raise ValueError("fusedce: the reduced cross_entropy takes (N, C) logits and (N,) int64 targets")
    rows, num_classes = x.shape
    acc = acc_dtype(x.dtype)
    if _degenerate(x) or denominator.dtype != acc or grad_out.dim() != 0:
        from ..._ops import _ce_reduced_backward  # the composite

        return _ce_reduced_backward(_backend(), grad_out, x, target, lse, denominator, ignore_index)
    if lse.dtype != acc or not lse.is_contiguous():  # never for ce_reduced_forward's own stats
        lse = lse.to(acc).contiguous()
    out = torch.empty(rows, num_classes, dtype=x.dtype, device=x.device)
    tiling = _tiling(rows, num_classes, (x.stride(1), 1), x.element_size(), x.device.type, _common.MAX_BLOCK_C)
    launch(
        _ce_reduced_bwd_kernel, tiling.grid,
        grad_out, denominator, x, target, lse, out,
        rows, num_classes, x.stride(0), x.stride(1), target.stride(0), ignore_index,
        ACC=tl_acc(x.dtype), BLOCK_R=tiling.block_r, BLOCK_C=tiling.block_c, COL_I64=tiling.col_i64,
        num_warps=tiling.num_warps,
    )  # fmt: skip
    return out


def _backend() -> ModuleType:
    """This backend's module (the composite calls its ce_forward/ce_backward)."""
    from .. import triton as backend

    return backend
