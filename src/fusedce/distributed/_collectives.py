"""The collectives: the forward's two (per call, or per row chunk of linear_cross_entropy), and
the backward's only ones: a probability path's weight gradient, and linear_cross_entropy's input
gradient.

Every call goes through ``torch.distributed`` by attribute (``dist.all_reduce``), so a wrapper
installed on the module (the benchmark's byte counter, a profiler) sees each of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.reference import accumulation_dtype

# A shard's class count travels inside the MAX all-reduce of the row maxima, as two float
# "digits" base 4096, so that it stays exact in float32 (24-bit mantissa) for any vocabulary
# below 2^36 classes per rank.
_DIGIT = 4096


def max_and_class_counts(
    row_max: Tensor, local_classes: int, learn_counts: bool, group: dist.ProcessGroup | None
) -> tuple[Tensor, list[int] | None]:
    """All-reduce (MAX) the per-row maxima; with ``learn_counts``, every rank's class count rides
    along in the same collective (zeros elsewhere lose the MAX). Returns the global row max and
    the counts in rank order (None when not learned).

    Reading the counts back is a host synchronisation on a GPU; pass ``shard_sizes`` to avoid it.
    """
    flat = row_max.reshape(-1)
    if not learn_counts:
        buffer = flat.clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
        return buffer.view_as(row_max), None
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    buffer = torch.zeros(flat.numel() + 2 * world, dtype=flat.dtype, device=flat.device)
    buffer[: flat.numel()] = flat
    buffer[flat.numel() + 2 * rank] = local_classes // _DIGIT
    buffer[flat.numel() + 2 * rank + 1] = local_classes % _DIGIT
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
    digits = buffer[flat.numel() :].view(world, 2).long().tolist()
    counts = [high * _DIGIT + low for high, low in digits]
    return buffer[: flat.numel()].view_as(row_max), counts


def checked_shard_sizes(
    shard_sizes: Sequence[int], local_classes: int, group: dist.ProcessGroup | None
) -> list[int]:
    """The caller's ``shard_sizes`` as ints, refused unless they name every rank and this rank's
    count is its own."""
    sizes = [int(s) for s in shard_sizes]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(sizes) != world or sizes[rank] != local_classes:
        raise ValueError(
            f"fusedce.distributed: shard_sizes={sizes} does not match this rank's "
            f"{local_classes} classes (rank {rank} of {world})"
        )
    return sizes


def sum_rows(packed: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce (SUM) the packed per-row sums, ``(k, outer, inner)``, in place."""
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed


def gather_class_slices(local: Tensor, offset: int, num_classes: int, group: dist.ProcessGroup | None) -> Tensor:
    """The full ``(C,)`` vector from each rank's disjoint slice: a SUM all-reduce of a zero
    vector holding this rank's slice. O(C), used only for a replicated weight's gradient."""
    full = local.new_zeros(num_classes)
    full[offset : offset + local.numel()] = local
    dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    return full


def sum_shares(partial: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The sum over ranks of each rank's share of a replicated tensor's gradient (linear_cross_entropy's
    input gradient), all-reduced once, in the accumulation dtype."""
    total = partial.to(accumulation_dtype(partial.dtype))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(partial.dtype)
