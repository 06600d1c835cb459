"""``fusedce.cross_entropy`` on a DTensor: what ``loss_parallel()`` does for torch, with every
argument (probability targets and label smoothing included) and a global 'mean' on any mesh.

The logits' placements decide the route, mesh dim by mesh dim:

* ``Shard(class_dim)`` on (at most) one mesh dim: the tensor-parallel dim. Its process group runs
  ``fusedce.distributed.cross_entropy`` on the local slices.
* ``Shard(d)`` on another dim: rows split over that mesh dim (data or sequence parallel); the
  rows are independent, so only the reduction crosses it.
* ``Replicate()``: nothing to do.
* ``Partial``: refused (the logits are not known until reduced; redistribute them first).

The target must be placed like the logits minus their class dim (``Replicate`` on the
tensor-parallel mesh dim); a DTensor target is redistributed to that layout, and a plain tensor
is accepted where that layout is all ``Replicate``, as in torch. A probability target is placed
like the logits. The weight is a plain tensor or a DTensor, used whole.

Outputs follow torch's ``loss_parallel``: 'none' is placed like the target, 'sum' is ``Partial``
over the row-sharded mesh dims (and ``Replicate`` elsewhere), and 'mean' is ``Replicate``: its
numerator and its denominator (``Σ w[t]`` or the row count) are summed over every row-sharded
mesh dim in one all-reduce of two numbers, so it is the global mean on any mesh.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .. import _checks
from .. import functional as single
from ..kernels.reference import accumulation_dtype
from . import functional as parallel


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    size_average: bool | None,
    ignore_index: int,
    reduce: bool | None,
    reduction: str,
    label_smoothing: float,
    inplace_backward: bool,
) -> Tensor:
    """``fusedce.cross_entropy`` for a DTensor ``input`` (see the module docstring)."""
    if inplace_backward:
        raise ValueError("fusedce: inplace_backward=True is not supported for DTensor logits")
    mode = single._resolve_reduction(size_average, reduce, reduction)
    assert isinstance(input, DTensor)
    mesh = input.device_mesh
    class_dim = 1 if input.dim() >= 2 else 0
    placements = tuple(input.placements)
    tp_dim = _tensor_parallel_dim(placements, class_dim)
    probability = tuple(target.shape) == tuple(input.shape)
    target_placements = placements if probability else _without_class_dim(placements, class_dim)
    local_target = _local(target, mesh, target_placements, "target", probability, input.shape)
    local_weight = None
    if weight is not None:
        local_weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
    x = input.to_local()

    local_mode: single.Reduction = "none" if mode == "none" else "sum"
    args = (local_weight, None, ignore_index, None, local_mode, label_smoothing)
    if tp_dim is None:
        loss = single.cross_entropy(x, local_target, *args)
    else:
        sizes: list[int] | None = _shard_sizes(input.shape[class_dim], mesh.size(tp_dim))
        if sizes is not None and sizes[mesh.get_local_rank(tp_dim)] != x.shape[class_dim]:
            sizes = None  # a layout other than torch.chunk's: learn the counts in the collective
        loss = parallel.cross_entropy(x, local_target, *args, group=mesh.get_group(tp_dim), shard_sizes=sizes)

    row_dims = [i for i, p in enumerate(placements) if p.is_shard() and i != tp_dim]
    if mode == "none":
        rows_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        out_placements = target_placements if not probability else _without_class_dim(placements, class_dim)
        return DTensor.from_local(
            loss, mesh, out_placements, shape=rows_shape, stride=_contiguous_strides(rows_shape)
        )
    if mode == "sum":
        sum_placements = [Partial() if i in row_dims else Replicate() for i in range(mesh.ndim)]
        return DTensor.from_local(loss, mesh, sum_placements, shape=torch.Size(), stride=())
    denominator = _local_denominator(local_target, local_weight, ignore_index, probability, x, class_dim)
    return _global_mean(loss, denominator, mesh, row_dims, smoothing_nan=not probability and label_smoothing > 0)


def _tensor_parallel_dim(placements: tuple[Placement, ...], class_dim: int) -> int | None:
    """The one mesh dim that shards the classes (None if none does); refuses what cannot work."""
    for i, p in enumerate(placements):
        if isinstance(p, Partial) or not (p.is_shard() or p.is_replicate()):
            raise ValueError(
                f"fusedce: cross_entropy needs DTensor logits placed as Shard or Replicate on every mesh "
                f"dim, got {type(p).__name__} ({p}) on mesh dim {i}; redistribute them first"
            )
    tp = [i for i, p in enumerate(placements) if p.is_shard(class_dim)]
    if len(tp) > 1:
        raise ValueError(
            f"fusedce: cross_entropy supports the class dim sharded over one mesh dim, got placements "
            f"{placements}; redistribute the logits so that one mesh dim shards the classes"
        )
    return tp[0] if tp else None


def _without_class_dim(placements: tuple[Placement, ...], class_dim: int) -> tuple[Placement, ...]:
    """The per-row layout: the class dim's sharding becomes Replicate, later dims shift down."""
    out: list[Placement] = []
    for p in placements:
        if isinstance(p, Shard):
            out.append(Replicate() if p.dim == class_dim else Shard(p.dim - (p.dim > class_dim)))
        else:
            out.append(p)
    return tuple(out)


def _local(
    tensor: Tensor, mesh: Any, placements: tuple[Placement, ...], name: str, probability: bool, shape: torch.Size
) -> Tensor:
    """This rank's part of ``tensor`` in ``placements``: a DTensor is redistributed (no message
    when it is already so placed); a plain index target must be replicated, as in torch."""
    if isinstance(tensor, DTensor):
        return tensor.redistribute(mesh, placements).to_local()
    _checks.check_tensor("cross_entropy_loss", name, 2, tensor)
    if probability and tuple(tensor.shape) == tuple(shape):
        # A probability target of the logits' global shape is the whole target (torch's
        # loss_parallel has no probability targets): each rank takes its part, without a message.
        whole = DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return whole.redistribute(mesh, placements).to_local()
    if any(p.is_shard() for p in placements):
        raise ValueError(
            f"fusedce: with these DTensor logits the {name} is sharded as {placements}; pass it as a "
            "DTensor (DTensor.from_local or distribute_tensor) so that which rows each rank holds is explicit"
        )
    return tensor


def _shard_sizes(size: int, parts: int) -> list[int]:
    """torch.chunk's split, which DTensor's Shard uses: ceil(size / parts) each, the rest last."""
    chunk = -(-size // parts) if parts else 0
    return [max(0, min(chunk, size - i * chunk)) for i in range(parts)]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _local_denominator(
    target: Tensor, weight: Tensor | None, ignore_index: int, probability: bool, x: Tensor, class_dim: int
) -> Tensor:
    """This rank's share of the 'mean' denominator: ``Σ w[t]`` over its non-ignored rows (the
    count without a weight), or its number of rows on the probability path."""
    acc = accumulation_dtype(x.dtype)
    if probability:
        rows = x.numel() // x.shape[class_dim] if x.shape[class_dim] else 0
        return torch.tensor(float(rows), dtype=acc, device=x.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    safe = torch.where(valid, target.long(), 0).clamp(0, max(weight.numel() - 1, 0))
    return torch.where(valid, weight.reshape(-1).to(acc)[safe], 0).sum()


def _global_mean(loss: Tensor, denominator: Tensor, mesh: Any, row_dims: list[int], smoothing_nan: bool) -> Tensor:
    """sum / denominator, both summed over the row-sharded mesh dims in one all-reduce."""
    dtype = loss.dtype
    packed = torch.stack([loss.to(denominator.dtype), denominator])
    if row_dims:
        placements = [Partial() if i in row_dims else Replicate() for i in range(mesh.ndim)]
        packed = DTensor.from_local(packed, mesh, placements).redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
    total, count = packed[0], packed[1]
    if smoothing_nan:
        # As in torch: a zero denominator makes the smoothed mean NaN, not inf.
        count = torch.where(count == 0, float("nan"), count)
    mean = (total / count).to(dtype)
    return DTensor.from_local(mean, mesh, [Replicate()] * mesh.ndim, shape=torch.Size(), stride=())
