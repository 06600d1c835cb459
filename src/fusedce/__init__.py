"""fusedce: fused cross-entropy for PyTorch.

A drop-in replacement for torch's cross-entropy family that fuses log-softmax with the loss, so
the log-probabilities are never materialised: the same values, gradients, dtypes, warnings and
errors as torch, in less time and memory.
"""

from . import _torch_version  # noqa: F401  (refuses a torch older than the minimum, first)

# isort: split
from . import distributed, functional
from .functional import cross_entropy, log_softmax, nll_loss, softmax
from .kernels import available_backends, empty_cache, use_backend
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss, LogSoftmax, NLLLoss, Softmax
from .patch import patch

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "Softmax",
    "available_backends",
    "cross_entropy",
    "distributed",
    "empty_cache",
    "functional",
    "linear_cross_entropy",
    "log_softmax",
    "nll_loss",
    "patch",
    "softmax",
    "use_backend",
]
