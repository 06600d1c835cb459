"""nn.Module drop-ins. Each subclasses the torch class it replaces, so isinstance, the ``weight``
buffer in state_dict, repr and pickling behave the same; forward is one call into functional."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import functional
from ._torch_version import HAS_LINEAR_CROSS_ENTROPY, require
from .linear import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "LogSoftmax", "NLLLoss", "Softmax"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss``, fused. ``inplace_backward`` and the LLM extras
    (``z_loss``, ``logit_softcap``, ``return_lse``) are documented in
    ``fusedce.functional.cross_entropy``."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        inplace_backward: bool = False,
        z_loss: float = 0.0,
        logit_softcap: float | None = None,
        return_lse: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.z_loss = z_loss
        self.logit_softcap = logit_softcap
        self.return_lse = return_lse

    def extra_repr(self) -> str:
        parts = ["inplace_backward=True"] if self.inplace_backward else []
        if self.z_loss != 0.0:
            parts.append(f"z_loss={self.z_loss}")
        if self.logit_softcap is not None:
            parts.append(f"logit_softcap={self.logit_softcap}")
        if self.return_lse:
            parts.append("return_lse=True")
        return ", ".join(parts)

    def __setstate__(self, state: dict) -> None:
        state.setdefault("inplace_backward", False)
        state.setdefault("z_loss", 0.0)
        state.setdefault("logit_softcap", None)
        state.setdefault("return_lse", False)
        super().__setstate__(state)

    # A (loss, lse) pair with return_lse=True, hence the wider return type than torch's.
    def forward(self, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        return functional.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
            z_loss=self.z_loss,
            logit_softcap=self.logit_softcap,
            return_lse=self.return_lse,
        )


# torch.nn.LinearCrossEntropyLoss is new in torch 2.13: on an older torch there is nothing to
# subclass, and constructing the drop-in raises (see _torch_version.require).
_LinearCrossEntropyBase: Any = nn.LinearCrossEntropyLoss if HAS_LINEAR_CROSS_ENTROPY else nn.Module


class LinearCrossEntropyLoss(_LinearCrossEntropyBase):
    """``torch.nn.LinearCrossEntropyLoss``, fused: the logits are never materialised.

    The constructor, the ``linear`` submodule (so the ``state_dict`` keys ``linear.weight`` and
    ``linear.bias``, stored flat) and the repr are torch's own; forward reshapes the flat weight
    exactly as torch's does and calls ``fusedce.linear_cross_entropy``. Needs torch >= 2.13.
    """

    if not HAS_LINEAR_CROSS_ENTROPY:

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            require("LinearCrossEntropyLoss", (2, 13))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        bias = self.linear.bias
        linear_bias = None if bias is None else bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
        )


class NLLLoss(nn.NLLLoss):
    """``torch.nn.NLLLoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.nll_loss(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction
        )


class LogSoftmax(nn.LogSoftmax):
    """``torch.nn.LogSoftmax``."""

    def forward(self, input: Tensor) -> Tensor:
        return functional.log_softmax(input, self.dim, _stacklevel=5)


class Softmax(nn.Softmax):
    """``torch.nn.Softmax``."""

    def forward(self, input: Tensor) -> Tensor:
        return functional.softmax(input, self.dim, _stacklevel=5)
