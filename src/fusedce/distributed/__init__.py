"""Vocabulary-parallel (tensor-parallel) cross-entropy over ``torch.distributed``.

``cross_entropy`` takes each rank's slice of the class dimension and returns the global loss on
every rank; ``linear_cross_entropy`` does the same from each rank's rows of a
vocabulary-sharded linear weight, without the logits; ``fusedce.cross_entropy`` routes a DTensor
sharded on the class dim here (see ``dtensor``). Ranks exchange O(rows) statistics per call, never logits.
"""

from .functional import cross_entropy
from .linear import linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
