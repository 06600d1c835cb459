"""Shared pieces of the Triton kernels: the row tiling, the launch heuristics and fp64 scalars.

Every kernel of this backend walks the canonical form ``(outer, C, inner)`` the same way. A program
owns a tile of ``BLOCK_R`` rows and loops over the classes in column blocks of ``BLOCK_C``. The rows
of a tile are picked in one of two ways (the ``INNER_TILE`` constexpr):

* ``INNER_TILE=False``: ``BLOCK_R`` consecutive flat rows ``r = o·inner + i``. This is the plain
  2-D case (``inner == 1``, classes contiguous): one row per program for a large vocabulary, many
  rows per program for a small one. It is also the fallback for any other strides.
* ``INNER_TILE=True``: ``BLOCK_R`` consecutive inner positions of one ``o``. It is used when the
  inner stride is 1 and the class stride is not (the K-dimensional NCHW case, e.g. segmentation):
  the tile's rows are then adjacent in memory, so loads coalesce along ``inner``.

Offsets are int64 from the row upwards, so tensors with more than 2^31 elements work.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import launcher as _launcher

# The largest column block per element size, on a GPU. A program streams a long row through
# registers in blocks of this many classes; 16 KiB of 16-bit logits or 8 KiB of fp32 per step.
GPU_MAX_BLOCK_C = {1: 4096, 2: 4096, 4: 2048, 8: 1024}

# Under the interpreter each program runs in Python; the column block is kept small there so that
# the test shapes (C = 1500) cross several blocks and exercise the online log-sum-exp.
INTERPRET_MAX_BLOCK_C = 512

# A test may force a smaller column block (and tile) with this knob; None means the defaults.
MAX_BLOCK_C: int | None = None

# Rows per program along ``inner`` in the INNER_TILE layout, at most.
MAX_BLOCK_INNER = 64

_INT32_MAX = 2**31 - 1

# Integer kernel arguments that Triton should not specialise on (value 1, multiple of 16): they
# gain nothing from it, and each specialisation is one more compilation on the GPU. Strides of
# the N×C operands and the class count stay specialised (a unit class stride is what vectorises).
NO_SPECIALIZE = ["n_rows", "inner_tiles"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton decides at import (at ``@triton.jit``) whether its kernels are interpreted.
_INTERPRETED = interpreting()

# The interpreter (3.9) truncates float32 -> bfloat16 instead of rounding to nearest even as the
# GPU does; the kernels then round by hand (see ``to_output``). False on the GPU: no code.
EMULATE_BF16_RTNE: tl.constexpr = tl.constexpr(_INTERPRETED)


def launch(kernel: Any, grid: int, *args: Any, **kwargs: Any) -> None:
    """``kernel[(grid,)](*args, **kwargs)``. Under the interpreter numpy would turn the IEEE
    results the GPU gives silently (``inf - inf``, ``0·inf``, an overflowing ``exp``) into
    RuntimeWarnings that torch does not raise; they are silenced there. On CUDA the launch goes
    through ``launcher.launch``, which skips Triton's per-call argument binding once a
    specialisation has been compiled (``FUSEDCE_TRITON_LAUNCH=plain`` turns that off)."""
    if _INTERPRETED:
        import numpy as np

        with np.errstate(all="ignore"):
            kernel[(grid,)](*args, **kwargs)
    else:
        _launcher.launch(kernel, grid, args, kwargs)


def check_device(x: torch.Tensor) -> None:
    """Host tensors only work under the interpreter; say so instead of crashing in the launcher."""
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"fusedce: the triton backend needs CUDA tensors (got {x.device.type}); "
            "set TRITON_INTERPRET=1 to run it on the CPU"
        )


def has_no_classes(x: torch.Tensor) -> bool:
    """C = 0: there is nothing for a kernel to read, and no class for an index target to pick
    (every row must be ignored). The callers return the reference's results, all masked."""
    return x.shape[1] == 0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types and float32 accumulate in float32; float64 stays in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def split_scalar(value: float) -> tuple[float, float]:
    """A Python float as a pair of float32s whose sum recovers it to about 2^-48.

    Triton passes a float argument as float32. The float64 kernels need the coefficient (1-ε,
    ε/C) to float64 precision, so they take ``hi + lo``; the float32 kernels use ``hi`` alone,
    which is the float32 rounding that torch applies to a Python scalar.
    """
    hi = _to_float32(value)
    return hi, _to_float32(value - hi)


def _to_float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


@dataclass(frozen=True)
class Tiling:
    """How a kernel covers ``rows = outer·inner`` rows of ``C`` classes."""

    block_r: int
    block_c: int
    inner_tile: bool
    inner_tiles: int  # programs per ``o`` along ``inner`` (INNER_TILE only; 1 otherwise)
    grid: int
    num_warps: int
    col_i64: bool  # class offsets need int64: (C-1)·|class stride| does not fit in int32

    def meta(self) -> dict[str, int | bool]:
        """The constexpr keyword arguments every kernel of this backend takes."""
        return {
            "BLOCK_R": self.block_r,
            "BLOCK_C": self.block_c,
            "INNER_TILE": self.inner_tile,
            "COL_I64": self.col_i64,
        }


def plan(
    outer: int,
    num_classes: int,
    inner: int,
    class_strides: tuple[int, ...],
    inner_strides: tuple[int, ...],
    itemsize: int,
    device: torch.device,
) -> Tiling:
    """Pick the tile for one launch from the shape, the strides of the N×C operands and the dtype.

    A heuristic instead of autotuning: the tile holds about ``max_block_c`` elements (16 KiB of
    16-bit data, 8 KiB of fp32), with as many of them in the class dim as the layout allows.
    ``class_strides`` and ``inner_strides`` are those of every N×C tensor the kernel touches; the
    INNER_TILE layout is chosen when all of them have unit inner stride and non-unit class stride.
    """
    rows = outer * inner
    if MAX_BLOCK_C is not None:
        cap = MAX_BLOCK_C
    elif device.type != "cuda":
        cap = INTERPRET_MAX_BLOCK_C
    else:
        cap = GPU_MAX_BLOCK_C.get(itemsize, 2048)
    c_pow2 = triton.next_power_of_2(max(num_classes, 1))
    inner_tile = (
        inner > 1 and num_classes > 1 and all(s == 1 for s in inner_strides) and all(s != 1 for s in class_strides)
    )
    if inner_tile:
        block_r = min(triton.next_power_of_2(inner), MAX_BLOCK_INNER, cap)
        block_c = min(c_pow2, max(1, cap // block_r))
        inner_tiles = triton.cdiv(inner, block_r)
        grid = outer * inner_tiles
    else:
        block_c = min(c_pow2, cap)
        block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, cap // block_c))
        inner_tiles = 1
        grid = triton.cdiv(rows, block_r)
    num_warps = max(1, min(8, (block_r * block_c) // 512))
    col_i64 = max((abs(s) for s in class_strides), default=1) * max(num_classes - 1, 0) > _INT32_MAX
    return Tiling(block_r, block_c, inner_tile, inner_tiles, grid, num_warps, col_i64)


# --------------------------------------------------------------------------------------------
# jit helpers shared by the kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def tile_rows(
    pid,
    n_rows,
    inner,
    inner_tiles,
    BLOCK_R: tl.constexpr,
    INNER_TILE: tl.constexpr,
):
    """This program's rows as int64 ``(o, i, r)`` vectors of BLOCK_R, and the in-bounds mask."""
    if INNER_TILE:
        o = (pid // inner_tiles).to(tl.int64) + tl.zeros([BLOCK_R], dtype=tl.int64)
        i = (pid % inner_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = i < inner
        r = o * inner + i
    else:
        r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = r < n_rows
        o = r // inner
        i = r % inner
    return o, i, r, mask


@triton.jit
def col_offsets(c0, stride_c, BLOCK_C: tl.constexpr, COL_I64: tl.constexpr):
    """The classes ``c0 .. c0+BLOCK_C`` and their element offsets along the class dim."""
    cols = c0 + tl.arange(0, BLOCK_C)
    offs = cols.to(tl.int64) * stride_c if COL_I64 else cols * stride_c
    return cols, offs


@triton.jit
def to_output(y, dtype: tl.constexpr):
    """``y.to(dtype)`` for a store, rounded to nearest even (by hand for bfloat16 under the
    interpreter, which truncates: the low 16 bits of the float32 are rounded away first)."""
    if EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        yf = y.to(tl.float32)
        bits = yf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(yf != yf, yf, bits.to(tl.float32, bitcast=True))
    return y.to(dtype)


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """A host coefficient in the accumulation dtype (see ``split_scalar``)."""
    if ACC == tl.float64:  # noqa: SIM300 - a constexpr dtype, compared at compile time
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def online_lse_step(m, s, xf, cmask):
    """Fold a [BLOCK_R, BLOCK_C] block into the running max ``m`` and the running ``s``.

    ``Σ exp(x - m)`` is kept as ``1 + s``: ``s`` holds the terms of every class but one maximal
    one (whose term is exactly 1), so that ``log1p(s)`` keeps the digits of a small ``s`` (a
    confident row, see ``reference.row_stats``). A block's lanes at the new max count as ``ties``
    (exact small integers) instead of adding their 1s to the sum. When the max grows from ``m``,
    the old total ``1 + s`` is rescaled and one of the new block's ties is the new excluded term;
    otherwise every tie adds 1. While a row's max is still -inf, the shift is 0 instead, so that
    ``exp(-inf - -inf)`` never makes a NaN: such a row keeps ``s = 0`` until a finite logit
    arrives. +inf and NaN still propagate (``exp(inf - inf)`` and ``exp(nan)`` are NaN, and
    neither is a tie), which is what the max-subtracted reference gives.
    """
    xm = tl.where(cmask, xf, float("-inf"))
    m_new = tl.maximum(m, tl.max(xm, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = xm - shift[:, None]
    # Ties by comparing values, not by d == 0: where xf is a product (the soft cap's cap·tanh),
    # the compiler may contract it with this subtraction into an FMA, whose d at the max is the
    # product's rounding error. A row still at -inf has shift 0, which no -inf lane equals; a
    # +inf is no tie, so that its exp(inf - inf) makes the row NaN, as in the reference.
    top = cmask & (xm == shift[:, None]) & (shift[:, None] != float("inf"))
    p = tl.where(cmask & ~top, tl.exp(d), 0.0)
    ties = tl.sum(tl.where(top, 1.0, 0.0), axis=1).to(s.dtype)
    grew = m_new > m
    carried = tl.where(grew, (1.0 + s) * tl.exp(m - shift) + (ties - 1.0), s + ties)
    return m_new, carried + tl.sum(p, axis=1)


@triton.jit
def lane_lse_step(m, s, x):
    """Fold one logit per lane into the lane's running max ``m`` and ``s`` (its ``Σ exp(x - m)``
    kept as ``1 + s``, as ``online_lse_step`` keeps a row's), with one exp per element and no
    reduction across lanes: ``exp(-|x - m|)`` is x's term when ``x <= m`` (exactly 1 for a tie),
    and the old total's rescale when x is the lane's new max, which becomes its excluded term.
    Two -infs make no term (not ``exp(nan)``); a NaN makes ``s`` NaN; a first +inf leaves
    ``s = 0`` (``combine_lanes`` makes such a row's ``s`` NaN, as the reference's ``inf - inf``)."""
    e = tl.where((x == float("-inf")) & (m == float("-inf")), 0.0, tl.exp(-tl.abs(x - m)))
    s = tl.where(x > m, (1.0 + s) * e, s + e)
    return tl.maximum(m, x), s


@triton.jit
def combine_lanes(m, s):
    """A [BLOCK_R, LANES] state of ``lane_lse_step`` as each row's ``(m, s)`` in
    ``online_lse_step``'s terms: the lanes at the row's max keep their ``s`` (their own maxima
    are the tied terms: all but one count 1), the others are rescaled. A row that is all -inf
    gets ``s = 0``, one whose max is +inf ``s = NaN``; a NaN anywhere leaves ``s`` NaN."""
    top = tl.max(m, axis=1)
    at_top = m == top[:, None]
    ties = tl.sum(tl.where(at_top, 1.0, 0.0), axis=1).to(s.dtype)
    rest = tl.sum(tl.where(at_top, s, (1.0 + s) * tl.exp(m - top[:, None])), axis=1) + (ties - 1.0)
    rest = tl.where((top == float("-inf")) & (rest == rest), 0.0, rest)
    return top, tl.where(top == float("inf"), float("nan"), rest)


@triton.jit
def _lanes_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
               LANES: tl.constexpr, COL_I64: tl.constexpr):
    m = tl.full([BLOCK_R, LANES], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R, LANES], ACC)
    for c0 in range(0, num_classes, LANES):
        cols, offs = col_offsets(c0, stride_xc, LANES, COL_I64)
        cmask = rmask[:, None] & (cols < num_classes)[None, :]
        x = tl.load(x_ptr + x_row[:, None] + offs[None, :], mask=cmask, other=float("-inf")).to(ACC)
        m, s = lane_lse_step(m, s, x)
    return combine_lanes(m, s)


@triton.jit
def row_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr, COL_I64: tl.constexpr):
    """The max ``m`` and ``s`` (as ``online_lse_step`` leaves them) of a tile of rows (each
    starting at ``x_row``), for the kernels that read nothing else along the way. Each lane keeps
    its own running values and the lanes meet once, at the end (``lane_lse_step``), where a
    per-block max and sum would cross the warps twice per block: on an H200 the lm-128k bf16
    row statistics took 1.42 ms this way against 1.71 (``scripts/gpu_lse_variants.py``), with
    2048 lanes in 8 warps (4096 lanes: 1.62 ms), hence half-width lanes for the widest tiles."""
    LANES: tl.constexpr = BLOCK_C // 2 if BLOCK_C >= 4096 else BLOCK_C
    return _lanes_lse(x_ptr, x_row, rmask, num_classes, stride_xc, ACC, BLOCK_R, LANES, COL_I64)


@triton.jit
def log1p(s):
    """``log(1 + s)`` for ``s >= 0`` to a few ulp (the interpreter has no libdevice log1p):
    ``s·log(u)/(u - 1)`` with ``u = 1 + s`` rounded, whose rounding error cancels in the ratio
    (Goldberg, "What every computer scientist should know about floating-point arithmetic")."""
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * (s / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def finish_logsum(m, s):
    """``log1p(s) = log Σ exp(x - m)`` (``s`` from ``online_lse_step``), NaN for a row that is all
    -inf (as ``-inf - -inf`` is in the reference). It is kept apart from ``m``: a rounded
    ``m + log(s)`` loses digits when the logits share a large offset (see ``reference.row_stats``)."""
    empty = m == float("-inf")
    return tl.where(empty, float("nan"), log1p(tl.where(empty, 0.0, s)))


@triton.jit
def reference_max(m, s):
    """The row max as the reference reports it: NaN when the row holds a NaN. The GPU's max
    instructions skip NaN (the interpreter's numpy does not), but a NaN logit always leaves
    ``s`` NaN, and so does nothing else while the max is not +inf (``online_lse_step``)."""
    return tl.where((s != s) & (m != float("inf")), float("nan"), m)


@triton.jit
def online_shifted_sum_step(total, weight_sum, m, m_new, wt, xf, cmask):
    """Fold a block into ``total = Σ wt_c·(m - x_c)``, the sum relative to the running max.

    ``weight_sum`` is ``Σ wt_c`` over the blocks already folded: when the max grows from ``m`` to
    ``m_new``, each of their terms grows by ``m_new - m``. Every term is ``≥ 0`` for non-negative
    weights, so the sum does not cancel, however far from zero the logits sit. A -inf logit's
    term is ``wt·inf`` (NaN for a zero weight) whatever the running max, as the reference's
    ``wt·((m - x) + log Σ)`` is once the row has a finite max (a row without one is NaN anyway).
    """
    d = tl.where(xf == float("-inf"), float("inf"), m_new[:, None] - xf)
    block = tl.sum(tl.where(cmask, wt * d, 0.0), axis=1)
    rescale = tl.where(m == float("-inf"), 0.0, weight_sum * (m_new - m))
    return total + rescale + block


@triton.jit
def store_stats(stats_ptr, r, m, logsum, rmask):
    """The ``(outer, inner, 2)`` row stats: the max, then ``log Σ exp(x - max)``."""
    tl.store(stats_ptr + 2 * r, m, mask=rmask)
    tl.store(stats_ptr + 2 * r + 1, logsum, mask=rmask)


@triton.jit
def load_stats(stats_ptr, r, rmask):
    """The row max and log-sum saved by ``store_stats`` (contiguous stats)."""
    m = tl.load(stats_ptr + 2 * r, mask=rmask, other=0.0)
    logsum = tl.load(stats_ptr + 2 * r + 1, mask=rmask, other=0.0)
    return m, logsum
