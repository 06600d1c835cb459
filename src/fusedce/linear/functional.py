"""``torch.nn.functional.linear_cross_entropy``, exactly, without the logits.

torch defines it as ``cross_entropy(linear(input, W, b).reshape(logits_shape), target, ...)``.
This function checks its arguments the way that reference path does, in its order: first
linear_cross_entropy's own checks, then ``linear``'s (run on a one-row, one-class slice, which
raises torch's own dtype and device errors and tells the logits' dtype), then cross_entropy's
(run on a stand-in for the logits that has their shape and dtype but no storage). The loss
itself is computed a block of rows at a time (``chunked``), and the reduction happens here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import _checks
from .. import functional as _ce
from ..kernels.reference import accumulation_dtype
from . import autograd
from .chunked import LossSpec, block_rows

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``, fused and chunked for every argument.

    The ``(N, C)`` logits are never materialised: rows go a block at a time through the matmul,
    the fused loss and (for 'mean' and 'sum', in the same pass) the gradients. ``options``
    (a ``torch.nn.LinearCrossEntropyOptions``) is accepted: its ``batch_chunk_size`` sets the
    rows per block, and its other fields are hints this implementation does not need. Unlike
    torch's chunked path, every argument combination is chunked (label smoothing, K-dim weights,
    uint8 and probability targets), and double backward, forward AD, ``torch.func`` and
    ``torch.compile`` all work, so no ``options ignored`` warning is ever due.
    """
    if has_torch_function_variadic(input, linear_weight, target, linear_bias, weight):
        return handle_torch_function(
            linear_cross_entropy, (input, linear_weight, target, linear_bias, weight), input, linear_weight,
            target, linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )
    # linear_cross_entropy's own checks, in torch's order and words.
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    batch, hidden = tuple(input.shape[:-1]), input.shape[-1]
    if hidden != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and not batch:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {hidden}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*batch, num_classes, *out_features)
    if tuple(target.shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = ignore_index if ignore_index is not None else -100
    chunk_request = None if options is None else options.batch_chunk_size

    width = math.prod(out_features, start=num_classes)
    w2 = linear_weight.reshape(width, hidden)
    b1 = None if linear_bias is None else linear_bias.reshape(width)
    logits = _stand_in_logits(input, w2, b1, logits_shape)
    return _loss(input, w2, b1, target, weight, logits, reduction, ignore_index, label_smoothing, chunk_request)


def _stand_in_logits(input: Tensor, w2: Tensor, b1: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """A tensor with the logits' shape, dtype and device, and no storage (no check reads more).

    ``linear`` on the first row and first class raises whatever torch's ``linear`` would raise
    for these arguments (dtype and device mismatches), at the cost of one dot product."""
    probe = torch.nn.functional.linear(input[:1] if input.dim() == 2 else input, w2[:1], None if b1 is None else b1[:1])
    return probe.detach().new_empty(()).expand(shape)


def _loss(
    input: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    logits: Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    chunk_request: int | None,
) -> Tensor:
    """cross_entropy's checks on the stand-in ``logits``, in ``fusedce.functional.cross_entropy``'s
    order, then the chunked loss."""
    mode = _ce._resolve_reduction(None, None, reduction)
    ignore_index = _checks.loss_arguments("cross_entropy_loss", logits, target, weight, ignore_index)
    smoothing = _checks.to_float_arg("cross_entropy_loss", "label_smoothing", 6, label_smoothing)
    prob = _checks.is_probability_target(logits, target)
    class_dim = 0 if logits.dim() == 1 else 1
    if prob:
        _checks.check_probability_target(logits, target, weight, ignore_index)
        _checks.check_softmax_dtype("log_softmax", logits, class_dim)
        smoothing = _checks.check_label_smoothing(smoothing)
    else:
        smoothing = _checks.check_label_smoothing(smoothing)
        _checks.check_softmax_dtype("log_softmax", logits, class_dim)
        _checks.check_nll(logits, target, weight, mode)
        if smoothing > 0:
            _checks.check_smoothing_quirks(logits, target, weight, mode)

    rows = 1 if input.dim() == 1 else input.shape[0]
    num_classes = logits.shape[class_dim]
    inner = math.prod(logits.shape[class_dim + 1 :])
    x2 = input.unsqueeze(0) if input.dim() == 1 else input
    dtype = logits.dtype
    if prob:
        dtype = torch.promote_types(dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        t = target.to(dtype).reshape(rows, num_classes, inner)
        w = None if weight is None else weight.to(dtype).contiguous()
        denominator = None
        if mode == "mean":  # the number of rows; NaN for an empty input, C = 0 included
            denominator = torch.tensor(rows * inner if logits.numel() else 0, dtype=accumulation_dtype(dtype),
                                       device=input.device)
    else:
        t = target.reshape(rows, inner)
        w = _ce._flat_weight(weight)
        denominator = _mean_denominator(t, w, ignore_index, smoothing, dtype) if mode == "mean" else None

    spec = LossSpec(num_classes, inner, prob, ignore_index, smoothing, dtype,
                    block_rows(rows, w2.shape[0], dtype, input.device, chunk_request))
    result = autograd.linear_cross_entropy(x2, w2, b1, t, w, denominator, spec, mode,
                                              _precompute(mode, input, w2, b1))
    if not prob:
        result = _ce._unbatched_target_quirk(logits, target, result, smoothing)
    if mode == "none":
        shape = () if logits.dim() == 1 else _ce._rows_shape(logits)
        return result.reshape(shape).to(dtype)
    return result.to(dtype)


def _mean_denominator(rows: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float,
                      dtype: torch.dtype) -> Tensor:
    """What 'mean' divides by, as ``fusedce.functional.cross_entropy`` computes it: the summed
    weights of the non-ignored targets (their count without weights); with smoothing, NaN
    instead of zero."""
    valid = rows != ignore_index
    acc = accumulation_dtype(dtype)
    if weight is None:
        denominator = valid.sum().to(acc)
    else:
        safe = rows.long().clamp(0, max(weight.numel() - 1, 0))
        picked = weight.to(acc).gather(0, safe.reshape(-1)).view_as(safe)
        denominator = torch.where(valid, picked, 0).sum()
    if smoothing > 0:
        denominator = torch.where(denominator == 0, float("nan"), denominator)
    return denominator


def _precompute(mode: str, input: Tensor, w2: Tensor, b1: Tensor | None) -> tuple[bool, bool, bool]:
    """Which gradients forward computes in its own pass: for a scalar reduction, those that will
    be wanted, except where the backward is traced or transformed (it then recomputes)."""
    if (
        mode == "none"
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        return (False, False, False)
    return (input.requires_grad, w2.requires_grad, b1 is not None and b1.requires_grad)
