"""The per-rank arithmetic on the local slice of the classes.

The index path's forward reads the local logits ONCE, in fusedce's fused kernel
(``fused_stats``): its row statistics ``[m, log Σ exp(x - m)]`` (and, with label smoothing, the
row's ``Σ w·(m - x)``) are rescaled to the global max in O(rows) afterwards
(``index_sums_from_stats``). The rest is torch ops on row chunks of about ``_CHUNK_ELEMENTS``
logits, so that the chunk's temporaries stay in cache: from memory's point of view each such
function reads the local logits once (and the backward writes the gradient once), although
torch runs several elementwise passes over each chunk. No temporary of the local logits' full
size is ever allocated.

Every shift in the torch-op passes is by the *global* row max ``M`` (all-reduced before they
run), so the quantities are torch's shift-invariant ``(x - M) - log S``, never ``x - lse`` with
a rounded ``lse``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .._ops import ops
from ..kernels.reference import accumulation_dtype

# About 512 KiB of float32 per chunk: small enough for a core's L2, large enough that the
# per-chunk Python overhead (a few microseconds per torch call) stays small.
_CHUNK_ELEMENTS = 1 << 17


def _chunks(x: Tensor) -> Iterator[slice]:
    """Slices of the outer dim of a canonical ``(outer, C, inner)`` tensor."""
    per_outer = max(x.shape[1] * x.shape[2], 1)
    step = max(1, _CHUNK_ELEMENTS // per_outer)
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


def row_max(x: Tensor) -> Tensor:
    """The ``(outer, inner)`` max over the local classes, in the accumulation dtype.

    ``-inf`` for a rank that holds no class (an empty shard), so that it never wins the MAX.
    Non-floating input gives zeros: the caller's dtype check raises torch's error after the
    collective, on every rank alike.
    """
    acc = accumulation_dtype(x.dtype)
    rows = (x.shape[0], x.shape[2])
    if x.shape[1] == 0:
        return torch.full(rows, float("-inf"), dtype=acc, device=x.device)
    if not x.is_floating_point():
        return torch.zeros(rows, dtype=acc, device=x.device)
    return x.amax(dim=1).to(acc)


class LocalStats(NamedTuple):
    """This rank's statistics of each row ``(outer, inner)``, in the accumulation dtype."""

    row_max: Tensor  # m over the local classes; -inf for an empty shard
    log_sum: Tensor | None  # log Σ exp(x - m); None: the sums pass computes Σ exp(x - M) itself
    gaps: Tensor | None  # Σ_c w_c·(m - x_c), for label smoothing; None: not computed here


def fused_stats(x: Tensor, weight: Tensor | None, gaps: bool) -> LocalStats:
    """``[m, log Σ exp(x - m)]`` per row from fusedce's fused forward, in one read of the
    logits; with ``gaps``, also ``Σ w·(m - x)``, weighted by ``weight`` (this rank's slice).

    The kernel runs with label smoothing 1 on a dummy target (class 0, never ignored): its loss
    is then ``(1/C)·Σ_c w_c·((m - x_c) + log Σ)``, from which ``Σ w·(m - x)`` comes back as
    ``C·loss - W·log Σ``. Two non-negative terms of the same order: a few ulp, no cancellation
    of large offsets. Rows whose class 0 is ``-inf`` make that loss NaN (``0·inf`` in the
    kernel's target term); ``index_sums_from_stats`` recomputes them.

    Anything the kernel would refuse before the first collective (an empty shard, integer
    logits, a weight of the wrong dtype or size) gets the plain row max instead, and the torch
    passes later, after the checks that raise torch's errors on every rank alike.
    """
    usable = weight is None or (
        weight.dim() == 1 and weight.numel() == x.shape[1] and weight.dtype == x.dtype
        and weight.device == x.device
    )
    if x.shape[1] == 0 or not x.is_floating_point() or not usable:
        return LocalStats(row_max(x), None, None)
    rows = (x.shape[0], x.shape[2])
    dummy = torch.zeros((), dtype=torch.long, device=x.device).expand(rows)
    loss, stats = ops.ce_forward(x, dummy, weight if gaps else None, -1, 1.0 if gaps else 0.0)
    log_sum = stats[..., 1]
    shifted = None
    if gaps:
        total = float(x.shape[1]) if weight is None else weight.to(loss.dtype).sum()
        shifted = x.shape[1] * loss - total * log_sum
    return LocalStats(stats[..., 0], log_sum, shifted)


def index_sums_from_stats(
    x: Tensor, local: LocalStats, global_max: Tensor, weight: Tensor | None, smoothing: bool, out: Tensor
) -> None:
    """``index_sums`` from the fused kernel's statistics: ``Σ exp(x - M) = exp(log Σ + (m - M))``
    into ``out[0]`` and, with smoothing, ``Σ w·(M - x) = Σ w·(m - x) + W·(M - m)`` into
    ``out[2]``, in O(rows). A rank whose row is all ``-inf`` adds nothing to the first sum.

    Rows the kernel's sums cannot serve (class 0 at ``-inf``, see ``fused_stats``; or no gaps
    computed) take the torch pass's values; that pass runs only if such a row exists.
    """
    assert local.log_sum is not None
    m = local.row_max
    out[0] = torch.where(m == float("-inf"), 0, torch.exp(local.log_sum + (m - global_max)))
    if not smoothing:
        return
    if local.gaps is None:
        _gaps(x, global_max, weight, out)
        return
    total = float(x.shape[1]) if weight is None else weight.sum()
    out[2] = local.gaps + total * (global_max - m)
    redo = x[:, 0, :] == float("-inf")
    if bool(redo.any()):  # a host read (a GPU synchronisation), with label smoothing only
        recomputed = torch.empty_like(out)
        _gaps(x, global_max, weight, recomputed)
        out[2] = torch.where(redo, recomputed[2], out[2])


def _gaps(x: Tensor, global_max: Tensor, weight: Tensor | None, out: Tensor) -> None:
    """``Σ_c w_c·(M - x_c)`` into ``out[2]``: the torch pass of the smoothing sum alone."""
    for rows in _chunks(x):
        d = _shifted(x, global_max, rows)
        out[2, rows] = _weighted_gaps(d, weight)


def _weighted_gaps(shifted: Tensor, weight: Tensor | None) -> Tensor:
    """``Σ_c w_c·(M - x_c)`` per row of a chunk, from its ``x - M``."""
    gaps = shifted.sum(1) if weight is None else torch.einsum("ocr,c->or", shifted, weight)
    return gaps.neg_()


def _shifted(x: Tensor, global_max: Tensor, rows: slice) -> Tensor:
    """``x - M`` for a chunk of rows, in the accumulation dtype (a chunk-sized temporary)."""
    acc = accumulation_dtype(x.dtype)
    return torch.sub(x[rows].to(acc), global_max[rows].unsqueeze(1))


def index_sums(x: Tensor, global_max: Tensor, weight: Tensor | None, smoothing: bool, out: Tensor) -> None:
    """Write ``Σ_c exp(x_c - M)`` into ``out[0]`` and, with smoothing, ``Σ_c w_c·(M - x_c)``
    into ``out[2]``: this rank's share of each row's sums (``out`` is ``(k, outer, inner)``).

    Each smoothing term is non-negative (for non-negative weights), so the global sum has no
    cancellation, unlike ``W·M - Σ w·x``.
    """
    for rows in _chunks(x):
        d = _shifted(x, global_max, rows)
        if smoothing:
            out[2, rows] = _weighted_gaps(d, weight)
        out[0, rows] = d.exp_().sum(1)


def prob_sums(
    x: Tensor, target: Tensor, global_max: Tensor, weight: Tensor | None, smoothing: bool, out: Tensor
) -> None:
    """This rank's share of the probability path's row sums, into ``out`` ``(k, outer, inner)``:
    ``[Σ exp(x - M), Σ w·t, Σ w·t·(M - x)]`` and, with smoothing, ``Σ w·(M - x)``."""
    for rows in _chunks(x):
        d = _shifted(x, global_max, rows)
        t = target[rows].to(d.dtype)
        wt = t if weight is None else t * weight.view(1, -1, 1)
        out[1, rows] = wt.sum(1)
        out[2, rows] = (wt * d).sum(1).neg_()
        if smoothing:
            out[3, rows] = _weighted_gaps(d, weight)
        out[0, rows] = d.exp_().sum(1)


def _scaled_probabilities(x: Tensor, global_max: Tensor, scale: Tensor, rows: slice, out: Tensor) -> Tensor:
    """``scale·exp(x - M)`` for a chunk, in the accumulation dtype: with ``scale = c / S`` this
    is ``c·p``, exact to a few ulp and shift-invariant (no ``x - lse`` with a rounded lse).
    Computed in place in ``out[rows]`` when ``out`` has the accumulation dtype (no temporary)."""
    acc = accumulation_dtype(x.dtype)
    shifted = x[rows].to(acc) - global_max[rows].unsqueeze(1) if out.dtype != acc else torch.sub(
        x[rows], global_max[rows].unsqueeze(1), out=out[rows]
    )
    return shifted.exp_().mul_(scale[rows].unsqueeze(1))


def index_grad(
    x: Tensor,
    global_max: Tensor,
    sum_exp: Tensor,
    prob_coef: Tensor,
    smooth_coef: Tensor | None,
    weight: Tensor | None,
    target_coef: Tensor,
    local_target: Tensor,
    out: Tensor,
) -> None:
    """``grad_c = prob_coef·p_c - smooth_coef·w_c - target_coef·[c == t]`` into ``out``.

    The coefficients are per row: ``target_coef`` is zero where this rank does not hold the
    row's target, and ``local_target`` is the target's index in this rank's slice (0 there).
    ``smooth_coef`` is None without label smoothing; ``weight`` None means all ones.
    """
    scale = prob_coef / sum_exp
    for rows in _chunks(x):
        grad = _scaled_probabilities(x, global_max, scale, rows, out)
        if smooth_coef is not None:
            coef = smooth_coef[rows].unsqueeze(1)
            if weight is None:
                grad.sub_(coef)
            else:
                grad.addcmul_(coef, weight.view(1, -1, 1), value=-1)
        grad.scatter_add_(1, local_target[rows].unsqueeze(1), target_coef[rows].neg().unsqueeze(1))
        if grad.dtype != out.dtype:
            out[rows] = grad


def prob_grad(
    x: Tensor,
    target: Tensor,
    global_max: Tensor,
    sum_exp: Tensor,
    grad_loss: Tensor,
    target_sum: Tensor,
    weight: Tensor | None,
    smoothing: float,
    num_classes: int,
    out: Tensor,
) -> None:
    """``grad_c = g·(A·p_c - w_c·t'_c)`` into ``out``, with ``A = Σ_k w_k·t'_k`` (global, per row)."""
    scale = grad_loss * target_sum / sum_exp
    for rows in _chunks(x):
        grad = _scaled_probabilities(x, global_max, scale, rows, out)
        wt = smoothed(target[rows].to(grad.dtype), smoothing, num_classes)
        if weight is not None:
            wt = wt * weight.view(1, -1, 1)
        grad.sub_(wt.mul_(grad_loss[rows].unsqueeze(1)))
        if grad.dtype != out.dtype:
            out[rows] = grad


def smoothed(t: Tensor, smoothing: float, num_classes: int) -> Tensor:
    """``t' = t·(1-ε) + ε/C`` with the global ``C``."""
    return t * (1 - smoothing) + smoothing / num_classes if smoothing > 0 else t


def neg_log_probs(x: Tensor, global_max: Tensor, log_sum: Tensor, rows: slice) -> Tensor:
    """``-log p = log S - (x - M)`` for a chunk, in the accumulation dtype."""
    return _shifted(x, global_max, rows).neg_().add_(log_sum[rows].unsqueeze(1))


def prob_target_grad(
    x: Tensor, global_max: Tensor, log_sum: Tensor, grad_loss: Tensor, weight: Tensor | None,
    smoothing: float, out: Tensor,
) -> None:
    """``∂loss/∂t_c = g·(1-ε)·w_c·(log S - (x_c - M))`` into ``out`` (this rank's classes)."""
    scale = 1 - smoothing if smoothing > 0 else 1.0
    for rows in _chunks(x):
        grad = neg_log_probs(x, global_max, log_sum, rows).mul_((scale * grad_loss[rows]).unsqueeze(1))
        if weight is not None:
            grad.mul_(weight.view(1, -1, 1))
        out[rows] = grad


def prob_weight_grad(
    x: Tensor, target: Tensor, global_max: Tensor, log_sum: Tensor, grad_loss: Tensor,
    smoothing: float, num_classes: int,
) -> Tensor:
    """``∂loss/∂w_c = Σ_rows g·t'_c·(log S - (x_c - M))`` for this rank's classes."""
    total = torch.zeros(x.shape[1], dtype=accumulation_dtype(x.dtype), device=x.device)
    for rows in _chunks(x):
        nlp = neg_log_probs(x, global_max, log_sum, rows)
        t = smoothed(target[rows].to(nlp.dtype), smoothing, num_classes)
        total += torch.einsum("ocr,ocr,or->c", t, nlp, grad_loss[rows].to(nlp.dtype))
    return total
