"""The autograd Functions of the vocabulary-parallel cross_entropy: the forward's second
collective, and a backward that communicates nothing (it reads the saved global row statistics).

Both take the local logits in canonical form ``(outer, C_local, inner)`` and the global row max
``M`` (already all-reduced), and return the *global* per-row loss, identical on every rank.
The gradient each rank returns is the one of that global loss with respect to its own slice.
The arithmetic is in ``_rows`` (shared with ``linear_cross_entropy``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from . import _collectives, _local, _rows


class VocabParallelCrossEntropy(Function):
    """Index targets, with weight, ignore_index and label smoothing (see ``_rows.index_forward``)."""

    @staticmethod
    def forward(
        ctx: Any,
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
    ) -> Tensor:
        loss, rows = _rows.index_forward(
            x, target, weight, local, global_max, offset, num_classes, ignore_index, smoothing, group
        )
        ctx.smoothing, ctx.num_classes, ctx.offset = smoothing, num_classes, offset
        ctx.save_for_backward(x, weight, *rows)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        nones = (None,) * 9
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rows.index_grad_(
            grad_loss, x, _rows.IndexRows(*saved), weight, ctx.offset, ctx.num_classes, ctx.smoothing, grad
        )
        return (grad, *nones)


class VocabParallelCrossEntropyProb(Function):
    """Probability targets sharded like the logits, with weight and label smoothing (see
    ``_rows.prob_forward``)."""

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
        loss, rows = _rows.prob_forward(x, target, weight, global_max, offset, num_classes, smoothing, group)
        ctx.smoothing, ctx.num_classes, ctx.offset, ctx.group = smoothing, num_classes, offset, group
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(x, target, weight, *rows)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, target, weight, *saved = ctx.saved_tensors
        rows = _rows.ProbRows(*saved)
        eps, num_classes, offset = ctx.smoothing, ctx.num_classes, ctx.offset
        grad_x = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _rows.prob_grad_(grad_loss, x, target, rows, weight, offset, num_classes, eps, grad_x)
        if ctx.needs_input_grad[1]:
            grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
            _rows.prob_target_grad_(grad_loss, x, rows, weight, offset, eps, grad_target)
        if ctx.needs_input_grad[2]:
            # The weight is replicated, so its gradient must be the full vector on every rank:
            # the one communication of this backward, which autograd semantics force.
            local = _rows.prob_weight_grad(grad_loss, x, target, rows, eps, num_classes)
            full = _collectives.gather_class_slices(local, offset, num_classes, ctx.group)
            grad_weight = full.to(ctx.weight_dtype)
        return grad_x, grad_target, grad_weight, None, None, None, None, None
