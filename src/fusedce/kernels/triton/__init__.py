"""The Triton backend: the CUDA kernels (and, under ``TRITON_INTERPRET=1``, the same kernels on CPU).

It implements every function of ``fusedce.kernels.reference`` with the same signature and
semantics; see that module for the conventions. The kernels follow the performance contract of
docs/design.md: the cross-entropy forward reads the logits once (an online log-sum-exp in float32, or
float64 for float64 input, over column blocks), and its backward reads them once and writes the
gradient once. Nothing in forward or backward synchronises with the host.

Out-of-bounds targets
---------------------
torch raises a device-side assert for an index target outside ``[0, C)`` on CUDA, which kills
the CUDA context. Checking on the host would need a synchronisation, so on CUDA these kernels
*poison* such a row instead: its loss, and its gradient, are NaN. On CPU tensors (the
interpreter) the host check is free, so ``reference.check_targets`` runs first and raises torch's
``IndexError`` like every other backend; hence ``CHECKS_TARGETS`` is True.

Layout and tiling are described in ``_common``. ``ce_prob_target_grad`` and
``ce_prob_weight_grad`` are the reference's (rare N×C paths). ``ce_reduced_forward`` and
``ce_reduced_backward`` (not reference functions: the plain (N, C) 'mean'/'sum' loss in one launch
each way) are in ``reduced``.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype
from .cross_entropy import (
    ce_backward,
    ce_extras_backward,
    ce_extras_forward,
    ce_forward,
    ce_prob_backward,
    ce_prob_forward,
    ce_prob_target_grad,
    ce_prob_weight_grad,
)
from .nll import nll_backward, nll_forward
from .reduced import ce_reduced_backward, ce_reduced_forward
from .softmax import log_softmax_backward, log_softmax_forward, softmax_backward, softmax_forward

# Index targets out of [0, C) raise torch's IndexError on CPU tensors; on CUDA they give NaN rows.
CHECKS_TARGETS = True

__all__ = [
    "CHECKS_TARGETS",
    "accumulation_dtype",
    "ce_backward",
    "ce_extras_backward",
    "ce_extras_forward",
    "ce_forward",
    "ce_prob_backward",
    "ce_prob_forward",
    "ce_prob_target_grad",
    "ce_prob_weight_grad",
    "ce_reduced_backward",
    "ce_reduced_forward",
    "ensure_available",
    "log_softmax_backward",
    "log_softmax_forward",
    "nll_backward",
    "nll_forward",
    "softmax_backward",
    "softmax_forward",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types and float32 accumulate in float32; float64 stays in float64."""
    return acc_dtype(dtype)


def ensure_available() -> None:
    """Raise if Triton cannot be used here (it is imported above, so an ImportError comes first)."""
    import triton
    import triton.language

    if not hasattr(triton, "jit"):
        raise ImportError("fusedce: the installed triton has no triton.jit")
