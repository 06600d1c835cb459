"""The linear-head workloads (``lmhead``): hidden states times a vocabulary projection, then
cross-entropy, as a language model's last layer computes its loss.

A workload's ``shape`` is the logits' ``(N, C)`` (so "×logits" figures mean the same as for the
plain loss) and its ``in_features`` is ``H``. The providers:

* ``fusedce``: ``fusedce.linear_cross_entropy``, which never holds the logits;
* ``torch-chunked``: torch's own chunked path, ``F.linear_cross_entropy(...,
  options=nn.LinearCrossEntropyOptions())``;
* ``eager``: ``F.linear`` then ``F.cross_entropy``, the logits materialised;
* ``compile``: ``torch.compile`` of that;
* ``liger``: Liger's fused linear cross-entropy, on CUDA when it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._torch_version import HAS_LINEAR_CROSS_ENTROPY
from ..linear import linear_cross_entropy
from .workloads import IGNORE_EVERY, IGNORE_INDEX, Inputs, Workload

OP = "linear_cross_entropy"
PROVIDERS = ("fusedce", "torch-chunked", "eager", "compile", "liger")


def workloads(device: str) -> list[Workload]:
    """lmhead: a 32k vocabulary over a 512-wide model on CPU; Llama 3's 128k over 4096 on CUDA."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if device == "cuda":
        real = [Workload("lmhead", OP, (16384, 128256), bf16, in_features=4096)]
    else:
        real = [Workload("lmhead", OP, (4096, 32000), dtype, in_features=512) for dtype in (fp32, bf16)]
    return [*real, Workload("micro-lmhead", OP, (16, 7), fp32, hidden=True, in_features=8)]


def make_inputs(workload: Workload, device: str, seed: int = 0) -> Inputs:
    """Hidden states ~ N(0, 1) and a weight ~ N(0, 4/H), so the logits are about N(0, 2²) as in
    the plain workloads; some targets are ignore_index. Both take gradients; nothing is
    overwritten, so there is no master copy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, classes = workload.shape
    hidden = workload.in_features
    x = torch.randn((rows, hidden), generator=gen, device=device).to(workload.dtype).requires_grad_()
    weight = torch.randn((classes, hidden), generator=gen, device=device).mul_(2 / hidden**0.5)
    weight = weight.to(workload.dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen, device=device)
    target.view(-1)[::IGNORE_EVERY] = IGNORE_INDEX
    return Inputs(None, x, target, None, linear_weight=weight)


def _eager(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(x, weight), target, ignore_index=IGNORE_INDEX)


def _torch_chunked(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    options = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(x, weight, target, ignore_index=IGNORE_INDEX, options=options)


def _fusedce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return linear_cross_entropy(x, weight, target, ignore_index=IGNORE_INDEX)


def _liger(device: str) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    if device != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # a broken install counts as none
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def call(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        return loss(weight, x, target)

    return call


def implementations(device: str, dynamic_compile: bool) -> dict[str, Callable[[], Callable[..., Tensor] | None]]:
    """Provider name -> a maker of its ``(x, weight, target) -> loss`` (None where unavailable)."""
    return {
        "fusedce": lambda: _fusedce,
        # torch's chunked path is new in 2.13: an older torch (the GPU machine's 2.11) has none.
        "torch-chunked": lambda: _torch_chunked if HAS_LINEAR_CROSS_ENTROPY else None,
        "eager": lambda: _eager,
        "compile": lambda: torch.compile(_eager, dynamic=dynamic_compile),
        "liger": lambda: _liger(device),
    }


def call_with(impl: Callable[..., Tensor]) -> Callable[[Inputs], Tensor]:
    def call(inputs: Inputs) -> Tensor:
        return impl(inputs.x, inputs.linear_weight, inputs.target)

    return call
