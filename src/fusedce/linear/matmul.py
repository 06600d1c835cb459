"""The block loop's float32 matmuls on CPU: through oneDNN where torch's own ``mm`` would call MKL.

torch's CPU ``mm`` in float32 calls MKL's sgemm; MKL keeps its AVX-512 kernels for Intel CPUs, and
on an AVX-512 AMD CPU it ran at about half the rate of oneDNN's AVX-512 float32 kernels on the
same cores (4096×512 by 512×32000: 117 against 236 GFLOP/s, interleaved, two threads; at the
block loop's shapes, 131 rows, the gap was wider). torch reaches oneDNN's float32 matmul through
``torch.ops.mkldnn._linear_pointwise`` (``x @ W.T + b``, the op Inductor's CPU fusions call). It
is plain float32 arithmetic: oneDNN reduces precision only when torch is told to
(``torch.backends.mkldnn.matmul.fp32_precision``), as for ``mm`` itself. Its one limit here: it
has no ``out=`` and no in-place accumulation, so the weight gradient's running sum stays on
``addmm_`` (a oneDNN product per block plus an ``add_`` of it measured slower: it reads and writes
the sum once more).

Half precision already goes through oneDNN inside ``mm`` (its bf16 kernels), and other dtypes
keep ``mm``: ``onednn`` is true only for float32 CPU tensors with every dim non-empty.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _linear_pointwise_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # a build without the mkldnn ops
        return False


_AVAILABLE = _linear_pointwise_available()


def onednn(x: Tensor, w: Tensor) -> bool:
    """Whether ``x @ w.T`` goes through oneDNN: float32 CPU operands, nothing empty, and oneDNN
    neither missing nor switched off (``torch.backends.mkldnn.flags(enabled=False)``)."""
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.numel() > 0
        and w.numel() > 0
        and bool(torch.backends.mkldnn.enabled)
    )


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T + b`` as a new tensor, through oneDNN (callers check ``onednn(x, w)`` first).
    ``w`` may be any 2-D strides (``W.t()`` included): oneDNN reads it in place, unpacked."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
