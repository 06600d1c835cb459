"""The per-row statistics of the vocabulary-parallel loss, shared by its two users.

``cross_entropy`` calls these once on all the rows of the local logits; ``linear_cross_entropy``
calls them once per row chunk, on that chunk's logits. Each forward takes the local logits in
canonical form ``(outer, C_local, inner)`` and the global row max ``M`` (already all-reduced),
computes this rank's share of the row sums, makes them global with ONE packed SUM all-reduce,
and returns the *global* per-row loss (identical on every rank) with the per-row statistics the
backward reads. The backward helpers write this rank's gradient from those statistics, with no
communication.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.reference import accumulation_dtype
from . import _collectives, _local


def local_weight(weight: Tensor | None, offset: int, count: int, dtype: torch.dtype) -> Tensor | None:
    """This rank's slice of the global class weight, in ``dtype``."""
    return None if weight is None else weight[offset : offset + count].to(dtype)


def total_weight(weight: Tensor | None, num_classes: int, dtype: torch.dtype) -> float | Tensor:
    """``W = Σ_c w_c`` over the global classes (``C`` without a weight)."""
    return float(num_classes) if weight is None else weight.to(dtype).sum()


def cat_rows(parts: list[tuple[Tensor, ...]]) -> list[Tensor]:
    """Concatenate per-chunk statistics (tuples of per-row tensors) along the rows."""
    return [torch.cat(field) for field in zip(*parts, strict=True)]


# --------------------------------------------------------------------------------------------
# Index targets
# --------------------------------------------------------------------------------------------


class IndexRows(NamedTuple):
    """What the index path's backward reads, per row ``(outer, inner)``."""

    global_max: Tensor  # M, the global row max
    sum_exp: Tensor  # S = Σ_c exp(x_c - M) over the global classes
    w_target: Tensor  # w[t] (1 without a weight)
    local_target: Tensor  # t's index in this rank's slice, 0 where this rank does not hold it
    owned: Tensor  # whether this rank holds the (non-ignored) target
    valid: Tensor  # whether the row is not ignored


def index_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    local: _local.LocalStats,
    global_max: Tensor,
    offset: int,
    num_classes: int,
    ignore_index: int,
    smoothing: float,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, IndexRows]:
    """The global per-row loss (0 on ignored rows) and the backward's statistics, from this
    rank's statistics ``local`` (``_local.fused_stats``) and the all-reduced row max.

    The SUM all-reduce carries per row: ``Σ exp(x - M)``, ``x[t] - M`` (from the rank holding
    the target; 0 elsewhere) and, with smoothing, ``Σ w·(M - x)``: 2 or 3 floats a row.
    """
    acc = accumulation_dtype(x.dtype)
    local_classes = x.shape[1]
    w_local = local_weight(weight, offset, local_classes, acc)
    packed = torch.zeros((3 if smoothing > 0 else 2, x.shape[0], x.shape[2]), dtype=acc, device=x.device)
    if local.log_sum is None:  # the kernel could not run: the torch pass
        _local.index_sums(x, global_max, w_local, smoothing > 0, packed)
    else:
        _local.index_sums_from_stats(x, local, global_max, w_local, smoothing > 0, packed)

    t = target.long()
    valid = t != ignore_index
    owned = valid & (t >= offset) & (t < offset + local_classes)
    local_target = torch.where(owned, t - offset, 0)
    if local_classes:
        picked = x.gather(1, local_target.unsqueeze(1)).squeeze(1).to(acc)
        packed[1] = torch.where(owned, picked - global_max, 0)
    # A target no rank holds (only reachable where the host check is skipped: on a GPU)
    # makes the row NaN on every rank instead of a silently wrong loss.
    out_of_range = valid & ((t < 0) | (t >= num_classes))
    packed[1] = torch.where(out_of_range, float("nan"), packed[1])
    _collectives.sum_rows(packed, group)

    log_sum = packed[0].log()
    safe = torch.where(valid & ~out_of_range, t, 0)
    w_target = torch.ones_like(log_sum) if weight is None else weight.to(acc)[safe]
    loss = w_target * (log_sum - packed[1])
    if smoothing > 0:
        smooth = total_weight(weight, num_classes, acc) * log_sum + packed[2]
        loss = (1 - smoothing) * loss + (smoothing / num_classes) * smooth
    rows = IndexRows(global_max, packed[0], w_target, local_target, owned, valid)
    return torch.where(valid, loss, 0), rows


def index_grad_(
    grad_loss: Tensor,
    x: Tensor,
    rows: IndexRows,
    weight: Tensor | None,
    offset: int,
    num_classes: int,
    smoothing: float,
    out: Tensor,
) -> None:
    """This rank's gradient of the global loss into ``out`` (which may be ``x`` itself: each
    chunk of ``x`` is read before the same chunk of ``out`` is written)."""
    if not x.shape[1]:
        return
    acc = rows.sum_exp.dtype
    eps = smoothing
    # g multiplies the bracket rather than replacing it, so an ignored NaN row keeps its NaN
    # gradient, as in torch; an all-ignored 'mean' (g = 1/0 everywhere) gives zeros.
    g = torch.where(rows.valid, grad_loss.to(acc), 0)
    target_coef = (1 - eps) * g * rows.w_target if eps > 0 else g * rows.w_target
    smooth_coef = g * (eps / num_classes) if eps > 0 else None
    prob_coef = target_coef
    if smooth_coef is not None:
        prob_coef = target_coef + smooth_coef * total_weight(weight, num_classes, acc)
    target_coef = torch.where(rows.owned, target_coef, 0)
    w_local = local_weight(weight, offset, x.shape[1], acc)
    _local.index_grad(
        x, rows.global_max, rows.sum_exp, prob_coef, smooth_coef, w_local, target_coef, rows.local_target, out
    )


# --------------------------------------------------------------------------------------------
# Probability targets (sharded like the logits)
# --------------------------------------------------------------------------------------------


class ProbRows(NamedTuple):
    """What the probability path's backward reads, per row ``(outer, inner)``."""

    global_max: Tensor  # M
    sum_exp: Tensor  # S = Σ_c exp(x_c - M)
    log_sum: Tensor  # log S
    target_sum: Tensor  # A = Σ_c w_c·t'_c over the global classes


def prob_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    global_max: Tensor,
    offset: int,
    num_classes: int,
    smoothing: float,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, ProbRows]:
    """The global per-row loss ``A·log S + B`` and the backward's statistics.

    ``A = Σ w·t'`` and ``B = Σ w·t'·(M - x)``: both terms are non-negative for non-negative
    targets and weights (``M - x ≥ 0``, ``S ≥ 1``), so this is not the cancelling
    ``lse·Σt - Σ t·x``. The SUM all-reduce carries ``[S, Σ w·t, Σ w·t·(M - x)]`` and, with
    smoothing, ``Σ w·(M - x)``: 3 or 4 floats a row.
    """
    acc = accumulation_dtype(x.dtype)
    w_local = local_weight(weight, offset, x.shape[1], acc)
    packed = torch.zeros((4 if smoothing > 0 else 3, x.shape[0], x.shape[2]), dtype=acc, device=x.device)
    _local.prob_sums(x, target, global_max, w_local, smoothing > 0, packed)
    _collectives.sum_rows(packed, group)

    log_sum = packed[0].log()
    target_sum, gaps = packed[1], packed[2]
    if smoothing > 0:
        share = smoothing / num_classes
        target_sum = (1 - smoothing) * target_sum + share * total_weight(weight, num_classes, acc)
        gaps = (1 - smoothing) * gaps + share * packed[3]
    return target_sum * log_sum + gaps, ProbRows(global_max, packed[0], log_sum, target_sum)


def prob_grad_(
    grad_loss: Tensor, x: Tensor, target: Tensor, rows: ProbRows, weight: Tensor | None, offset: int,
    num_classes: int, smoothing: float, out: Tensor,
) -> None:
    """This rank's gradient with respect to its logits, into ``out`` (which may be ``x``)."""
    g = grad_loss.to(rows.log_sum.dtype)
    w_local = local_weight(weight, offset, x.shape[1], rows.log_sum.dtype)
    _local.prob_grad(x, target, rows.global_max, rows.sum_exp, g, rows.target_sum, w_local, smoothing,
                     num_classes, out)


def prob_target_grad_(
    grad_loss: Tensor, x: Tensor, rows: ProbRows, weight: Tensor | None, offset: int, smoothing: float,
    out: Tensor,
) -> None:
    """The gradient with respect to this rank's slice of the probability target, into ``out``."""
    g = grad_loss.to(rows.log_sum.dtype)
    w_local = local_weight(weight, offset, x.shape[1], rows.log_sum.dtype)
    _local.prob_target_grad(x, rows.global_max, rows.log_sum, g, w_local, smoothing, out)


def prob_weight_grad(
    grad_loss: Tensor, x: Tensor, target: Tensor, rows: ProbRows, smoothing: float, num_classes: int
) -> Tensor:
    """The gradient with respect to this rank's slice of the class weight (accumulation dtype);
    the caller gathers the slices (``_collectives.gather_class_slices``)."""
    g = grad_loss.to(rows.log_sum.dtype)
    return _local.prob_weight_grad(x, target, rows.global_max, rows.log_sum, g, smoothing, num_classes)
