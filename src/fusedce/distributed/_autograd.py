"""The autograd Functions of the vocabulary-parallel loss: the forward's second collective, and a
backward that communicates nothing (it reads the saved global row statistics).

Both take the local logits in canonical form ``(outer, C_local, inner)`` and the global row max
``M`` (already all-reduced), and return the *global* per-row loss, identical on every rank.
The gradient each rank returns is the one of that global loss with respect to its own slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..kernels.reference import accumulation_dtype
from . import _collectives, _local


def _local_weight(weight: Tensor | None, offset: int, count: int, dtype: torch.dtype) -> Tensor | None:
    return None if weight is None else weight[offset : offset + count].to(dtype)


class VocabParallelCrossEntropy(Function):
    """Index targets, with weight, ignore_index and label smoothing.

    The SUM all-reduce carries per row: ``Σ exp(x - M)``, ``x[t] - M`` (from the rank holding
    the target; 0 elsewhere) and, with smoothing, ``Σ w·(M - x)``: 2 or 3 floats a row.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        global_max: Tensor,
        offset: int,
        num_classes: int,
        ignore_index: int,
        smoothing: float,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        acc = accumulation_dtype(x.dtype)
        local_classes = x.shape[1]
        w_local = _local_weight(weight, offset, local_classes, acc)
        packed = torch.zeros((3 if smoothing > 0 else 2, x.shape[0], x.shape[2]), dtype=acc, device=x.device)
        _local.index_sums(x, global_max, w_local, smoothing > 0, packed)

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
        total_weight = float(num_classes) if weight is None else weight.to(acc).sum()
        if smoothing > 0:
            smooth = total_weight * log_sum + packed[2]
            loss = (1 - smoothing) * loss + (smoothing / num_classes) * smooth

        ctx.smoothing, ctx.num_classes, ctx.total_weight = smoothing, num_classes, total_weight
        ctx.save_for_backward(x, global_max, packed[0], w_target, local_target, owned, valid, w_local)
        return torch.where(valid, loss, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, global_max, sum_exp, w_target, local_target, owned, valid, w_local = ctx.saved_tensors
        nones = (None,) * 8
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        eps, num_classes = ctx.smoothing, ctx.num_classes
        # g multiplies the bracket rather than replacing it, so an ignored NaN row keeps its NaN
        # gradient, as in torch; an all-ignored 'mean' (g = 1/0 everywhere) gives zeros.
        g = torch.where(valid, grad_loss.to(sum_exp.dtype), 0)
        target_coef = (1 - eps) * g * w_target if eps > 0 else g * w_target
        smooth_coef = g * (eps / num_classes) if eps > 0 else None
        prob_coef = target_coef + smooth_coef * ctx.total_weight if smooth_coef is not None else target_coef
        target_coef = torch.where(owned, target_coef, 0)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.shape[1]:
            _local.index_grad(
                x, global_max, sum_exp, prob_coef, smooth_coef, w_local, target_coef, local_target, grad
            )
        return (grad, *nones)


class VocabParallelCrossEntropyProb(Function):
    """Probability targets sharded like the logits, with weight and label smoothing.

    ``loss = A·log S + B`` with ``A = Σ w·t'`` and ``B = Σ w·t'·(M - x)``: both terms are
    non-negative for non-negative targets and weights (``M - x ≥ 0``, ``S ≥ 1``), so this is not
    the cancelling ``lse·Σt - Σ t·x``. The SUM all-reduce carries ``[S, Σ w·t, Σ w·t·(M - x)]``
    and, with smoothing, ``Σ w·(M - x)``: 3 or 4 floats a row.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        global_max: Tensor,
        offset: int,
        num_classes: int,
        smoothing: float,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        acc = accumulation_dtype(x.dtype)
        w_local = _local_weight(weight, offset, x.shape[1], acc)
        packed = torch.zeros((4 if smoothing > 0 else 3, x.shape[0], x.shape[2]), dtype=acc, device=x.device)
        _local.prob_sums(x, target, global_max, w_local, smoothing > 0, packed)
        _collectives.sum_rows(packed, group)

        log_sum = packed[0].log()
        target_sum, gaps = packed[1], packed[2]
        if smoothing > 0:
            total_weight = float(num_classes) if weight is None else weight.to(acc).sum()
            share = smoothing / num_classes
            target_sum = (1 - smoothing) * target_sum + share * total_weight
            gaps = (1 - smoothing) * gaps + share * packed[3]
        ctx.smoothing, ctx.num_classes, ctx.offset, ctx.group = smoothing, num_classes, offset, group
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(x, target, w_local, global_max, packed[0], log_sum, target_sum)
        return target_sum * log_sum + gaps

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, target, w_local, global_max, sum_exp, log_sum, target_sum = ctx.saved_tensors
        eps, num_classes = ctx.smoothing, ctx.num_classes
        g = grad_loss.to(log_sum.dtype)
        grad_x = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _local.prob_grad(x, target, global_max, sum_exp, g, target_sum, w_local, eps, num_classes, grad_x)
        if ctx.needs_input_grad[1]:
            grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
            _local.prob_target_grad(x, global_max, log_sum, g, w_local, eps, grad_target)
        if ctx.needs_input_grad[2]:
            # The weight is replicated, so its gradient must be the full vector on every rank:
            # the one communication of this backward, which autograd semantics force.
            local = _local.prob_weight_grad(x, target, global_max, log_sum, g, eps, num_classes)
            full = _collectives.gather_class_slices(local, ctx.offset, num_classes, ctx.group)
            grad_weight = full.to(ctx.weight_dtype)
        return grad_x, grad_target, grad_weight, None, None, None, None, None
