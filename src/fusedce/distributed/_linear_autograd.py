"""The vocabulary-parallel linear + cross-entropy: its row-chunk loops and its autograd Function.

Each rank holds the rows ``w2`` ``(C_local*D, H)`` of the linear weight for its classes (and
the same slice ``b1`` of the bias); the hidden state ``x2`` ``(N, H)`` is replicated. A chunk of
rows goes through, in ONE reused buffer (``fusedce.linear``'s ``_Block``):

1. the matmul ``x2[rows] @ w2.T + b1``: this rank's logits of the chunk, ``(n, C_local, D)``;
2. the MAX all-reduce of the chunk's row maxima, then this rank's row sums and the one packed
   SUM all-reduce that makes them global (``_rows``, the same code ``cross_entropy`` runs):
   the global per-row loss, on every rank;
3. for a scalar reduction, in the same pass: the gradient of the logits, written over the
   buffer, then ``grad_W_local += g.T @ x`` and this rank's share of ``grad_x = g @ w2``.

The rank-local parts of the input gradient are summed across ranks ONCE, in backward (an
all-reduce of ``N×H``), never per chunk. ``reduction='none'`` and the gradients of a
probability target or of the class weights recompute the chunk logits in backward from the
saved per-row statistics (O(rows)), with no collective but that one.

Every rank must run the same number of chunks (each holds two collectives), so the chunk size
is chosen from the largest shard, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..kernels.reference import accumulation_dtype
from ..linear.autograd import _grad_rows, _reduce, _upstream_scale
from ..linear.chunked import LossSpec, _Block, _blocks, _Gradients
from . import _collectives, _local, _rows


@dataclass(frozen=True)
class ParallelSpec:
    """The arguments every loop needs, fixed for one call."""

    local: LossSpec  # this rank's block: num_classes is C_local; chunk is the same on every rank
    num_classes: int  # the global C
    offset: int  # this rank's first class
    mode: str  # 'none', 'sum' or 'mean'
    group: dist.ProcessGroup | None


def _chunk_forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, spec: ParallelSpec
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The chunk's global per-row loss and statistics: two collectives. The index path reads
    the chunk's logits once, in the fused kernel (``_local.fused_stats``)."""
    s = spec.local
    if s.prob:
        local = _local.LocalStats(_local.row_max(logits), None, None)
    else:
        w_local = None
        if weight is not None and s.smoothing > 0:
            w_local = weight[spec.offset : spec.offset + logits.shape[1]]
        local = _local.fused_stats(logits, w_local, s.smoothing > 0)
    global_max, _ = _collectives.max_and_class_counts(local.row_max, logits.shape[1], False, spec.group)
    if s.prob:
        return _rows.prob_forward(logits, target, weight, global_max, spec.offset, spec.num_classes,
                                  s.smoothing, spec.group)
    return _rows.index_forward(logits, target, weight, local, global_max, spec.offset, spec.num_classes,
                               s.ignore_index, s.smoothing, spec.group)


def _chunk_grad_(
    grad_rows: Tensor, logits: Tensor, target: Tensor, rows: tuple[Tensor, ...], weight: Tensor | None,
    spec: ParallelSpec,
) -> None:
    """The chunk's logits gradient, written over ``logits``."""
    s = spec.local
    if s.prob:
        _rows.prob_grad_(grad_rows, logits, target, _rows.ProbRows(*rows), weight, spec.offset,
                         spec.num_classes, s.smoothing, logits)
    else:
        _rows.index_grad_(grad_rows, logits, _rows.IndexRows(*rows), weight, spec.offset, spec.num_classes,
                          s.smoothing, logits)


def forward_sweep(
    x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None, spec: ParallelSpec,
    grad_rows: Tensor | None, wanted: tuple[bool, bool, bool],
) -> tuple[Tensor, list[Tensor], _Gradients]:
    """Per-row global losses ``(N, D)``, the per-row statistics (one tensor per field), and the
    accumulators of this rank's ``wanted`` gradients of (x2, w2, b1) when ``grad_rows`` is given."""
    block = _Block(x2, w2, spec.local)
    # Every row is computed (no ignored-row skipping: each rank must run the same collectives).
    grads = _Gradients(x2, w2, b1, wanted if grad_rows is not None else (False, False, False), False, spec.local.chunk)
    losses: list[Tensor] = []
    parts: list[tuple[Tensor, ...]] = []
    for start, stop in _blocks(x2.shape[0], spec.local.chunk):
        x_rows = x2[start:stop]
        flat, logits = block.logits(x_rows, w2, b1)
        loss, rows = _chunk_forward(logits, target[start:stop], weight, spec)
        losses.append(loss)
        parts.append(tuple(rows))
        if grad_rows is not None and any(wanted):
            _chunk_grad_(grad_rows[start:stop], logits, target[start:stop], rows, weight, spec)
            grads.add(slice(start, stop), block.gradient(flat, logits), x_rows, w2)
    grads.finish()
    if not losses:  # no rows, on every rank: no chunk, no collective
        acc = accumulation_dtype(spec.local.dtype)
        return x2.new_zeros((0, spec.local.inner), dtype=acc), [], grads
    return torch.cat(losses), _rows.cat_rows(parts), grads


def backward_sweep(
    grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None,
    stats: list[Tensor], spec: ParallelSpec, wanted: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Recompute each chunk's logits and return this rank's ``wanted`` gradients of (x2, w2, b1,
    the probability target's slice, the class weight's slice): no collective."""
    block = _Block(x2, w2, spec.local)
    grads = _Gradients(x2, w2, b1, (wanted[0], wanted[1], wanted[2]), False, spec.local.chunk)
    s = spec.local
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if wanted[3] else None
    grad_weight = None
    if wanted[4]:
        grad_weight = torch.zeros(w2.shape[0] // s.inner, dtype=accumulation_dtype(s.dtype), device=w2.device)
    for start, stop in _blocks(x2.shape[0], s.chunk):
        x_rows = x2[start:stop]
        flat, logits = block.logits(x_rows, w2, b1)
        g, t = grad_rows[start:stop], target[start:stop]
        rows = tuple(field[start:stop] for field in stats)
        # The target and weight gradients read the logits, so they come before the in-place gradient.
        if grad_target is not None:
            _rows.prob_target_grad_(g, logits, _rows.ProbRows(*rows), weight, spec.offset, s.smoothing,
                                    grad_target[start:stop])
        if grad_weight is not None:
            grad_weight += _rows.prob_weight_grad(g, logits, t, _rows.ProbRows(*rows), s.smoothing,
                                                  spec.num_classes)
        if any(wanted[:3]):
            _chunk_grad_(g, logits, t, rows, weight, spec)
            grads.add(slice(start, stop), block.gradient(flat, logits), x_rows, w2)
    grads.finish()
    return grads.x, grads.w, grads.b, grad_target, grad_weight


class VocabParallelLinearCrossEntropy(Function):
    """``reduce(cross_entropy(x2 @ W.T + b))`` with ``W`` sharded by rows across the group.

    Returns the global result (per-row losses ``(N, D)`` for 'none', a 0-dim tensor otherwise,
    in the accumulation dtype), identical on every rank. For a scalar reduction the wanted
    gradients of (x2, w2, b1) are computed in the forward's pass (``precompute``) for a unit
    upstream gradient; the backward scales them, once (a second backward recomputes).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x2: Tensor,
        w2: Tensor,
        b1: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        denominator: Tensor | None,
        spec: ParallelSpec,
        precompute: tuple[bool, bool, bool],
    ) -> Tensor:
        rows_shape = (x2.shape[0], spec.local.inner)
        grad_rows = None
        if any(precompute):
            one = torch.ones((), dtype=accumulation_dtype(spec.local.dtype), device=x2.device)
            grad_rows = _grad_rows(one, spec.mode, denominator, rows_shape)
        loss, stats, grads = forward_sweep(x2, w2, b1, target, weight, spec, grad_rows, precompute)
        ctx.spec, ctx.rows_shape = spec, rows_shape
        ctx.precomputed = [grads.x, grads.w, grads.b] if grad_rows is not None else None
        ctx.save_for_backward(x2, w2, b1, target, weight, denominator, *stats)
        return _reduce(loss, spec.mode, denominator)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, w2, b1, target, weight, denominator, *stats = ctx.saved_tensors
        spec: ParallelSpec = ctx.spec
        needs = ctx.needs_input_grad
        prob = spec.local.prob
        wanted = [needs[0], needs[1], needs[2] and b1 is not None, needs[3] and prob,
                  needs[4] and prob and weight is not None]
        grads: list[Tensor | None] = [None] * 5
        precomputed, ctx.precomputed = ctx.precomputed, None
        missing = list(wanted)
        if precomputed is not None:
            scale = _upstream_scale(grad_out)  # 1 (loss.backward()): no pass over the gradients
            for i in range(3):
                if wanted[i] and precomputed[i] is not None:
                    grads[i] = precomputed[i] if scale == 1.0 else precomputed[i].mul_(scale)
                    missing[i] = False
        if any(missing):
            grad_rows = _grad_rows(grad_out, spec.mode, denominator, ctx.rows_shape)
            recomputed = backward_sweep(grad_rows, x2, w2, b1, target, weight, stats, spec,
                                        (missing[0], missing[1], missing[2], missing[3], missing[4]))
            for i, g in enumerate(recomputed):
                if missing[i]:
                    grads[i] = g
        if grads[0] is not None:
            # The one collective of this backward: every rank's share of the input gradient.
            grads[0] = _collectives.sum_shares(grads[0], spec.group)
        if grads[1] is not None:
            grads[1] = grads[1].to(w2.dtype)
        if grads[2] is not None and b1 is not None:
            grads[2] = grads[2].to(b1.dtype)
        if grads[4] is not None and weight is not None:
            # A replicated weight needs its full gradient on every rank (as in cross_entropy).
            full = _collectives.gather_class_slices(grads[4], spec.offset, spec.num_classes, spec.group)
            grads[4] = full.to(weight.dtype)
        return (*grads, None, None, None)
