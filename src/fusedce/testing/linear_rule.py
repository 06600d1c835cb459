"""How the parity checker judges ``linear_cross_entropy``'s gradients in low precision.

torch's reference path (``cross_entropy(linear(input, W, b))``) and fusedce's fused one both round
the logits to the dtype, and both round the logits' gradient ``G`` to the dtype before the two
gradient matmuls (``G @ W`` for the input, ``Gᵀ @ input`` for the weight, ``Σ_rows G`` for the
bias). The float64 truth, the whole op run in float64, has neither rounding; summed over the
classes or the rows, the two roundings move a gradient element by many ulps of itself where the
terms cancel, whoever computes it. So a gradient that fails against that truth is judged again:

* against the float64 gradient taken through the logits rounded to the dtype (the rounding both
  implementations make; torch's own error against it is credited as usual), and
* with a further margin that bounds what rounding ``G`` can change: ``eps · |G| @ |W|`` for the
  input, ``eps · |G|ᵀ @ |input|`` for the weight, ``eps · Σ_rows |G|`` for the bias, where ``eps``
  is the dtype's machine epsilon (twice the worst relative rounding) and ``G`` the float64 logits
  gradient of the line above.

A probability target's gradient involves no matmul: it gets no further margin.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .grid import Inputs


def rounded_logits_truth(
    inputs: Inputs, dtype: torch.dtype, upstream: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor | None], list[Tensor | None]] | None:
    """The float64 gradients through dtype-rounded logits, and each one's matmul margin.

    ``inputs`` are the case's inputs already in float64 (``Inputs.input`` the hidden state,
    ``Inputs.target`` the linear weight, the loss target in ``kwargs``); ``upstream`` gives the
    checker's upstream gradient for an output. Both lists follow ``inputs.differentiable()``.
    None when torch's own function refuses the inputs (the case is judged otherwise).
    """
    x, weight_matrix = inputs.input, inputs.target
    kwargs = dict(inputs.kwargs)
    target = kwargs.pop("target")
    bias = kwargs.pop("linear_bias", None)
    kwargs.pop("options", None)
    if kwargs.get("ignore_index") is None:  # linear_cross_entropy's None is cross_entropy's default
        kwargs.pop("ignore_index", None)
    num_classes, out_features, hidden = weight_matrix.shape[0], weight_matrix.shape[1:-1], weight_matrix.shape[-1]
    w2 = weight_matrix.reshape(-1, hidden)
    exact = F.linear(x, w2, None if bias is None else bias.reshape(-1))
    # Round to the dtype in the forward; let the gradient through unchanged (straight through).
    rounded = exact + (exact.to(dtype).double() - exact).detach()
    logits = rounded.view(*x.shape[:-1], num_classes, *out_features)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = F.cross_entropy(logits, target, **kwargs)
            differentiable = inputs.differentiable()
            grads = torch.autograd.grad(loss, [*differentiable, rounded], upstream(loss), allow_unused=True)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    *truths, logits_grad = grads
    if logits_grad is None:
        return None
    eps = torch.finfo(dtype).eps
    g = logits_grad.abs()
    margins: list[Tensor | None] = []
    for t in differentiable:
        if t is x:
            margins.append(eps * (g @ w2.abs()))
        elif t is weight_matrix:
            rows = g.reshape(-1, g.shape[-1])
            margins.append(eps * (rows.t() @ x.abs().reshape(-1, hidden)).view_as(weight_matrix))
        elif t is bias:
            margins.append(eps * g.reshape(-1, g.shape[-1]).sum(0).view_as(bias))
        else:
            margins.append(None)
    return list(truths), margins
