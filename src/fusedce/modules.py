"""nn.Module drop-ins. Each subclasses the torch class it replaces, so isinstance, the ``weight``
buffer in state_dict, repr and pickling behave the same; forward is one call into functional."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional

__all__ = ["CrossEntropyLoss", "LogSoftmax", "NLLLoss", "Softmax"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss``, fused. ``inplace_backward`` is documented in
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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def extra_repr(self) -> str:
        return "inplace_backward=True" if self.inplace_backward else ""

    def __setstate__(self, state: dict) -> None:
        state.setdefault("inplace_backward", False)
        super().__setstate__(state)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
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
