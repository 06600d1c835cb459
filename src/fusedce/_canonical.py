"""The canonical ``(outer, C, inner)`` form that every kernel takes.

For a reduction over ``dim``, ``outer`` is the product of the sizes before it and ``inner`` the
product of those after it. ``reshape`` returns a view whenever the strides allow one, which covers
contiguous, channels-last and most sliced inputs, so the K-dimensional case needs no transpose.
"""

from __future__ import annotations

import math

from torch import Tensor


def canonical(x: Tensor, dim: int) -> Tensor:
    """View ``x`` as (outer, size(dim), inner); ``dim`` must already be wrapped."""
    if x.dim() == 0:
        return x.reshape(1, 1, 1)
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    return x.reshape(outer, x.shape[dim], inner)


def canonical_rows(target: Tensor, outer: int, inner: int) -> Tensor:
    """View an index target (or a per-row tensor) as (outer, inner)."""
    return target.reshape(outer, inner)
