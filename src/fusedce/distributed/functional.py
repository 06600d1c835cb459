"""``fusedce.distributed.cross_entropy``: torch's ``F.cross_entropy`` over logits sharded on the
class dimension across a process group (vocabulary / tensor parallelism).

Each rank passes its own contiguous slice of the classes (in rank order; slices may be uneven,
even empty) and the *same* target, weight and arguments. Every rank gets the global result:
exactly what ``F.cross_entropy`` gives on the logits gathered along the class dim.

Communication per call, whatever the class count (``rows = N·d1·…·dk``):

1. one MAX all-reduce of the row maxima (``rows`` floats, plus ``2·world`` for the class counts
   when ``shard_sizes`` is not given);
2. one SUM all-reduce of the packed row sums (2 or 3 floats a row for index targets, 3 or 4 for
   probability targets; see ``_autograd``).

The backward communicates nothing, except the probability path's weight gradient (an O(C)
all-reduce, because a replicated weight needs its full gradient on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from .. import functional as single
from .._canonical import canonical, canonical_rows
from ..kernels.reference import accumulation_dtype, check_targets
from . import _collectives, _local
from ._autograd import VocabParallelCrossEntropy, VocabParallelCrossEntropyProb

__all__ = ["cross_entropy"]


def cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group: dist.ProcessGroup | None = None,
    shard_sizes: Sequence[int] | None = None,
) -> Tensor:
    """``F.cross_entropy`` over class-sharded logits; the result is the global one, on every rank.

    Args:
        local_logits: this rank's slice of the logits along the class dim (dim 1, or dim 0 for
            an unbatched ``(C,)`` input); the other dims are the global ones.
        target: the global target, identical on every rank: class indices of the global range
            ``[0, C)``, or class probabilities sharded exactly like ``local_logits``.
        weight: the global ``(C,)`` class weight, identical on every rank (each rank uses its
            slice; index-path 'mean' divides by the global ``Σ w[t]``).
        group: the process group the classes are sharded over (default: the world).
        shard_sizes: every rank's class count, in rank order. When omitted they are learned in
            the first collective at no extra message (but, on a GPU, with a host synchronisation
            to read them back).

    The remaining arguments are torch's, with torch's semantics, warnings and errors. Errors that
    depend on the global class count (out-of-range targets, weight size) are raised after the
    first collective, on every rank alike.
    """
    mode = single._resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.loss_arguments("cross_entropy_loss", local_logits, target, weight, ignore_index)
    smoothing = _checks.to_float_arg("cross_entropy_loss", "label_smoothing", 6, label_smoothing)
    if local_logits.dim() == 0:
        # Nothing to shard; torch's own error for a 0-dim input, raised identically everywhere.
        return single.cross_entropy(local_logits, target, weight, None, ignore_index, None, mode, smoothing)
    if _checks.is_probability_target(local_logits, target):
        return _prob(local_logits, target, weight, ignore_index, smoothing, mode, group, shard_sizes)
    return _index(local_logits, target, weight, ignore_index, smoothing, mode, group, shard_sizes)


class _Layout:
    """Where this rank's classes sit: its canonical view, this rank's row statistics, the global
    max and the class range.

    With ``fused`` (the index path), the statistics come from one read of the logits in the fused
    kernel (``_local.fused_stats``), label smoothing's weighted sum included when this rank's
    slice of ``weight`` is known before the first collective (``shard_sizes`` given, or no
    weight); otherwise the row max alone.
    """

    def __init__(
        self, x: Tensor, group: dist.ProcessGroup | None, shard_sizes: Sequence[int] | None,
        fused: bool = False, weight: Tensor | None = None, smoothing: bool = False,
    ) -> None:
        self.class_dim = 0 if x.dim() == 1 else 1
        self.x = canonical(x, self.class_dim)
        local_classes = self.x.shape[1]
        sizes = None
        if shard_sizes is not None:
            sizes = _collectives.checked_shard_sizes(shard_sizes, local_classes, group)
        detached = self.x.detach()
        if fused:
            known = sizes is not None or weight is None
            start = sum(sizes[: dist.get_rank(group)]) if sizes is not None else 0
            w_local = None if weight is None or not (smoothing and known) else weight[start : start + local_classes]
            self.local = _local.fused_stats(detached, w_local, smoothing and known)
        else:
            self.local = _local.LocalStats(_local.row_max(detached), None, None)
        self.global_max, learned = _collectives.max_and_class_counts(
            self.local.row_max, local_classes, shard_sizes is None, group
        )
        counts = sizes if sizes is not None else learned
        assert counts is not None
        rank = dist.get_rank(group)
        self.offset = sum(counts[:rank])
        self.num_classes = sum(counts)
        shape = list(x.shape)
        shape[self.class_dim] = self.num_classes
        # The gathered input's shape and dtype, for torch's own checks and reduction rules.
        self.global_input = torch.empty(shape, dtype=x.dtype, device="meta")


def _index(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    mode: single.Reduction,
    group: dist.ProcessGroup | None,
    shard_sizes: Sequence[int] | None,
) -> Tensor:
    # torch's order: the smoothing range, then log_softmax's dtype, then nll_loss's checks.
    smoothing = _checks.check_label_smoothing(smoothing)
    _checks.check_softmax_dtype("log_softmax", x, _checks.wrap_dim(0 if x.dim() == 1 else 1, x.dim()))
    flat_weight = single._flat_weight(weight)
    layout = _Layout(x, group, shard_sizes, fused=True, weight=flat_weight, smoothing=smoothing > 0)
    full = layout.global_input
    _checks.check_nll(full, target, weight, mode)
    if smoothing > 0:
        _checks.check_smoothing_quirks(full, target, weight, mode)
    rows = canonical_rows(target, layout.x.shape[0], layout.x.shape[2])
    if not rows.is_cuda:  # a host read: skipped on a GPU, where such rows become NaN instead
        check_targets(rows, layout.num_classes, ignore_index)
    loss = VocabParallelCrossEntropy.apply(
        layout.x, rows, flat_weight, layout.local, layout.global_max, layout.offset, layout.num_classes,
        ignore_index, smoothing, group,
    )
    loss = single._unbatched_target_quirk(full, target, loss, smoothing)
    return single._reduce_index_loss(loss, rows, flat_weight, ignore_index, mode, full, smoothing)


def _prob(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    mode: single.Reduction,
    group: dist.ProcessGroup | None,
    shard_sizes: Sequence[int] | None,
) -> Tensor:
    # torch checks the target's dtype and ignore_index before anything needs the class count.
    if not target.is_floating_point() or ignore_index >= 0:
        _checks.check_probability_target(x, target, weight, ignore_index)
    layout = _Layout(x, group, shard_sizes)
    full = layout.global_input
    _checks.check_probability_target(full, target, weight, ignore_index)
    _checks.check_softmax_dtype("log_softmax", full, layout.class_dim)
    smoothing = _checks.check_label_smoothing(smoothing)

    dtype = torch.promote_types(x.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    xc = layout.x if x.dtype == dtype else canonical(x.to(dtype), layout.class_dim)
    t = canonical(target.to(dtype), layout.class_dim)
    w = None if weight is None else weight.to(dtype).contiguous()
    global_max = layout.global_max.to(accumulation_dtype(dtype))  # exact: it is one of the logits
    loss = VocabParallelCrossEntropyProb.apply(
        xc, t, w, global_max, layout.offset, layout.num_classes, smoothing, group
    )
    if mode == "none":
        return loss.reshape(single._rows_shape(full)).to(dtype)
    total = loss.sum()
    if mode == "sum":
        return total.to(dtype)
    # torch divides by the number of rows (N·d1·…·dk), and gives NaN for an empty input.
    count = loss.numel() if full.numel() else 0
    return (total / count).to(dtype)
