"""``fusedce.distributed.linear_cross_entropy``: torch's ``F.linear_cross_entropy`` with the
linear weight sharded by rows (the vocabulary) across a process group.

Each rank passes the replicated hidden state, its contiguous slice of the weight's rows (in rank
order; slices may be uneven, even empty) and the same slice of the bias, and the *same* target
and arguments. Every rank gets the global result: exactly ``F.linear_cross_entropy`` on the
weight gathered along its first dim. No rank ever holds more logits than one row chunk of its
own classes (see ``_linear_autograd``).

Communication, whatever the class count (``rows = N·d1·…·dk``):

* without ``shard_sizes``, one all-reduce of ``2·world`` floats that learns every rank's class
  count (pass ``shard_sizes`` to skip it);
* per row chunk, the two all-reduces of ``cross_entropy`` (the row max, then the packed row
  sums): O(rows) in all;
* in backward, one SUM all-reduce of the input gradient (``N×H``), and for a probability target
  a class weight's gradient (``C``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from .. import functional as _ce
from ..kernels.reference import accumulation_dtype, check_targets
from ..linear.chunked import LossSpec, block_rows
from ..linear.functional import _mean_denominator, _stand_in_logits
from . import _collectives
from ._linear_autograd import ParallelSpec, VocabParallelLinearCrossEntropy

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    group: dist.ProcessGroup | None = None,
    shard_sizes: Sequence[int] | None = None,
) -> Tensor:
    """``F.linear_cross_entropy`` with ``linear_weight`` sharded by rows; the global result, on
    every rank.

    Args:
        input: the hidden state, ``(H,)`` or ``(N, H)``, identical on every rank.
        local_linear_weight: this rank's rows of the linear weight, ``(C_local, H)`` or
            ``(C_local, d1, …, dk, H)`` for a K-dim loss: the classes ``[offset, offset + C_local)``
            where ``offset`` is the sum of the lower ranks' counts.
        target: the global index target (classes of ``[0, C)``), identical on every rank; or the
            class probabilities of this rank's classes, shaped like its logits
            ``(N, C_local, d1, …, dk)``.
        linear_bias: this rank's slice of the bias, ``(C_local, d1, …, dk)``.
        weight: the global ``(C,)`` class weight, identical on every rank.
        options: a ``torch.nn.LinearCrossEntropyOptions``: its ``batch_chunk_size`` sets the rows
            per chunk (it must be the same on every rank); the other fields are hints.
        group: the process group the classes are sharded over (default: the world).
        shard_sizes: every rank's class count, in rank order; learned in one small all-reduce
            when omitted.

    The remaining arguments are torch's, with torch's semantics and errors. The gradient of
    ``input`` is the full one on every rank (all-reduced once); those of ``local_linear_weight``
    and ``linear_bias`` are this rank's slices.
    """
    # linear_cross_entropy's own checks, in torch's order and words; the class count in them is
    # this rank's (the only one known before the first collective).
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    w = local_linear_weight
    if w.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {w.dim()}")
    batch, hidden = tuple(input.shape[:-1]), input.shape[-1]
    if hidden != w.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {w.shape[-1]}, respectively"
        )
    local_classes, out_features = w.shape[0], tuple(w.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (local_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(local_classes, *out_features)} (this rank's slice), "
            f"got {tuple(linear_bias.shape)}"
        )
    if out_features and not batch:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(w.shape)} requires"
            f" batched input, (N, {hidden}), got unbatched input with shape {tuple(input.shape)}"
        )
    # A probability target is sharded like this rank's logits.
    prob = tuple(target.shape) == (*batch, local_classes, *out_features)
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = ignore_index if ignore_index is not None else -100

    sizes = _class_counts(local_classes, input.device, group, shard_sizes)
    rank = dist.get_rank(group)
    offset, num_classes = sum(sizes[:rank]), sum(sizes)
    inner = math.prod(out_features)
    w2 = w.reshape(local_classes * inner, hidden)
    b1 = None if linear_bias is None else linear_bias.reshape(local_classes * inner)
    # The gathered logits' shape and dtype, without storage, for torch's own checks.
    full = _stand_in_logits(input, w2, b1, (*batch, num_classes, *out_features))

    mode = _ce._resolve_reduction(None, None, reduction)
    ignore_index = _checks.loss_arguments("cross_entropy_loss", full, target, weight, ignore_index)
    smoothing = _checks.to_float_arg("cross_entropy_loss", "label_smoothing", 6, label_smoothing)
    class_dim = 0 if full.dim() == 1 else 1
    x2 = input.unsqueeze(0) if input.dim() == 1 else input
    rows = x2.shape[0]
    dtype = full.dtype
    if prob:
        _checks.check_probability_target(full, target, weight, ignore_index)
        _checks.check_softmax_dtype("log_softmax", full, class_dim)
        smoothing = _checks.check_label_smoothing(smoothing)
        dtype = torch.promote_types(dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        t = target.to(dtype).reshape(rows, local_classes, inner)
        w1 = None if weight is None else weight.to(dtype).contiguous()
        denominator = None
        if mode == "mean":  # the number of rows; NaN for an empty input, C = 0 included
            count = rows * inner if full.numel() else 0
            denominator = torch.tensor(count, dtype=accumulation_dtype(dtype), device=input.device)
    else:
        smoothing = _checks.check_label_smoothing(smoothing)
        _checks.check_softmax_dtype("log_softmax", full, class_dim)
        _checks.check_nll(full, target, weight, mode)
        if smoothing > 0:
            _checks.check_smoothing_quirks(full, target, weight, mode)
        t = target.reshape(rows, inner)
        if not t.is_cuda:  # a host read: skipped on a GPU, where such rows become NaN instead
            check_targets(t, num_classes, ignore_index)
        w1 = _ce._flat_weight(weight)
        denominator = _mean_denominator(t, w1, ignore_index, smoothing, dtype) if mode == "mean" else None

    # The same chunk size on every rank (each chunk holds collectives): sized for the largest shard.
    chunk = block_rows(rows, max(sizes, default=0) * inner, dtype, input.device,
                       None if options is None else options.batch_chunk_size)
    local = LossSpec(local_classes, inner, prob, ignore_index, smoothing, dtype, chunk)
    spec = ParallelSpec(local, num_classes, offset, mode, group)
    result = VocabParallelLinearCrossEntropy.apply(
        x2, w2, b1, t, w1, denominator, spec, _precompute(mode, x2, w2, b1, t, w1, prob)
    )
    if not prob:
        result = _ce._unbatched_target_quirk(full, target, result, smoothing)
    if mode == "none":
        return result.reshape(() if full.dim() == 1 else _ce._rows_shape(full)).to(dtype)
    return result.to(dtype)


def _class_counts(
    local_classes: int, device: torch.device, group: dist.ProcessGroup | None, shard_sizes: Sequence[int] | None
) -> list[int]:
    """Every rank's class count: ``shard_sizes`` checked against this rank's, or learned in one
    all-reduce of ``2·world`` floats."""
    if shard_sizes is not None:
        return _collectives.checked_shard_sizes(shard_sizes, local_classes, group)
    _, counts = _collectives.max_and_class_counts(
        torch.empty(0, dtype=torch.float32, device=device), local_classes, True, group
    )
    assert counts is not None
    return counts


def _precompute(
    mode: str, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None, prob: bool
) -> tuple[bool, bool, bool]:
    """Which gradients the forward computes in its own pass: for a scalar reduction, those that
    will be wanted, unless the backward must recompute the logits anyway (for the gradient of a
    probability target or of its class weights)."""
    if mode == "none" or not torch.is_grad_enabled():
        return (False, False, False)
    if prob and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return (False, False, False)
    return (x2.requires_grad, w2.requires_grad, b1 is not None and b1.requires_grad)
