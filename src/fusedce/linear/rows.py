"""Which rows the block loop computes: all of them, or only those not wholly ignored.

A row whose every target is ``ignore_index`` has a loss of exactly 0 and a logits gradient of
exactly 0, whatever its (finite) logits: torch masks the row's loss, and the log-softmax backward
of a zero upstream gradient is ``0 - softmax·0``. Its matmuls (a third of a row's logits, input
gradient and weight gradient work each) can then be skipped, and its loss, stats and input
gradient written as zeros. Language-model batches ignore padding and prompt tokens, so this is
often a sizeable share of the rows.

The one exception is a non-finite logit: torch then propagates NaN through the ignored row's
gradient (``exp(nan)·0``). So rows are skipped only when their logits are provably finite: for
a row ``x`` every logit is bounded by ``max|x| · max_c ‖W_c‖₁ + max|b|``, and that bound (with
headroom for the rounding of the bound itself) must stay below the logits dtype's largest
value. Otherwise every row is computed, as before.

Only on CPU, where the matmuls are the cost and the bound's host sync is free; the CUDA path
computes every row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..kernels import backend_for

# The bound is computed in the inputs' dtype (bf16 rounds to 8 bits) and the matmul sums in its
# own order; keeping it this far under the dtype's largest value covers both with a wide margin.
_HEADROOM = 16.0

Selection = slice | Tensor  # a block's rows: a slice of all rows, or the indices of kept ones


def computed_rows(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, prob: bool,
                  ignore_index: int) -> Tensor | None:
    """The indices of the rows to compute, or None for all of them (nothing to skip)."""
    if prob or x2.device.type != "cpu" or x2.shape[0] == 0 or target.dim() != 2:
        return None
    ignored = (target == ignore_index).all(dim=1)
    if not bool(ignored.any()):
        return None
    if not _logits_surely_finite(x2[ignored], w2, b1):
        return None
    return (~ignored).nonzero().squeeze(1)


def _logits_surely_finite(x_rows: Tensor, w2: Tensor, b1: Tensor | None) -> bool:
    if w2.numel() == 0 or x_rows.shape[1] == 0:
        return b1 is None or bool(torch.isfinite(b1).all())
    x_max = float(torch.linalg.vector_norm(x_rows, float("inf"), dim=1).max())
    w_max = _max_row_abs_sum(w2)
    bound = x_max * w_max + (0.0 if b1 is None or b1.numel() == 0 else float(b1.abs().max()))
    # NaN anywhere makes the comparison False, so such inputs compute every row.
    return bound * _HEADROOM < torch.finfo(w2.dtype).max


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # those max_row_abs_sum takes


def _max_row_abs_sum(w2: Tensor) -> float:
    """``max_c ‖W_c‖₁``: one float32 pass in the C++ backend where it runs (ATen's bf16
    ``vector_norm`` took 6.5 ms of the bf16 lmhead step for a 32 MB weight), else ATen's."""
    fast = getattr(backend_for(w2.device), "max_row_abs_sum", None)
    if fast is not None and w2.dim() == 2 and w2.is_contiguous() and w2.dtype in _FAST_DTYPES:
        return fast(w2)
    return float(torch.linalg.vector_norm(w2, 1, dim=1).max())


def selections(total: int, chunk: int, kept: Tensor | None) -> Iterator[Selection]:
    """Blocks of at most ``chunk`` computed rows."""
    if kept is None:
        for start in range(0, total, chunk):
            yield slice(start, min(start + chunk, total))
    else:
        for start in range(0, kept.shape[0], chunk):
            yield kept[start:start + chunk]


def take(t: Tensor, rows: Selection) -> Tensor:
    """The block's rows of ``t`` (a view for a slice, a gathered copy for indices)."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def spread(values: Tensor, kept: Tensor | None, total: int) -> Tensor:
    """Per-row results of the computed rows, as all ``total`` rows (zeros for skipped ones)."""
    if kept is None:
        return values
    out = values.new_zeros((total, *values.shape[1:]))
    return out.index_copy_(0, kept, values)
