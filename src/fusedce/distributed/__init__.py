"""Vocabulary-parallel (tensor-parallel) cross-entropy over ``torch.distributed``.

``cross_entropy`` takes each rank's slice of the class dimension and returns the global loss on
every rank; ``fusedce.cross_entropy`` routes a DTensor sharded on the class dim here (see
``dtensor``). Ranks exchange O(rows) statistics per call, never logits.
"""

from .functional import cross_entropy

__all__ = ["cross_entropy"]
