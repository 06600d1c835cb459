"""The size of the terms that cross_entropy's results are sums and differences of.

The rule of ``compare`` bounds each element's rounding by a few ulp of itself plus a floor at the
tensor's largest magnitude ``S``. Where an element is the difference of terms much larger than
``S``, that floor is too fine for any implementation, torch's included. cross_entropy is linear
in the log-probabilities: ``loss = Σ_c u_c·log p_c`` with ``u = ∂loss/∂log p``, and its gradient
with respect to the logits is ``u - p·Σ_c u_c``. A confident row with a near-one-hot probability
target makes every element of that gradient small (``p_c ≈ t_c``) while its terms stay of the
size of ``u``: an ulp of ``p`` (which every float32 computation rounds) is then most of the
result. So the logits' gradient is allowed ``c·eps·T`` more, per element, with

    T_c = |u_c| + p_c·Σ_k |u_k|,

which is the size of the two terms it is the difference of, not a tolerance: an element whose
terms do not cancel has ``T_c`` of its own size, and a lost term of the size of ``p_c·|u|``
still shows (``c·eps·T`` is far below it).

The float64 answer (torch's own result in float64, the truth in lower precision) forms
``log p = (x - m) - log Σ``, rounding the sum of exponentials (``>= 1``) at the ulp of 1 however
small ``log Σ`` is. A confident row's loss is about ``log Σ`` itself (4e-18 for logits 40 apart,
which float64 torch rounds to 0), so the answer is off by ``eps64·Σ_c |u_c|`` of it, where
fusedce's ``log1p`` keeps the digits. The value is allowed ``c·eps64·Σ_c |u_c|·(|log p_c| + 1)``,
per output element: the size of the loss's terms, each with that ulp of float64.

``u`` is read from torch's float64 graph itself (what it feeds its log_softmax), so that every
argument (weight, ignore_index, label smoothing, the reduction) counts as torch counts it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _find_node(fn: Any, name: str) -> Any:
    """The first node of an autograd graph whose name starts with ``name``, breadth first."""
    queue, seen = [fn], set()
    while queue:
        node = queue.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name().startswith(name):
            return node
        queue.extend(next_fn for next_fn, _ in node.next_functions)
    return None


def log_prob_upstream(call: Callable[[], Tensor], logits: Tensor, grad: Tensor | None) -> Tensor | None:
    """``u = ∂loss/∂log p`` in torch's float64 graph of ``call()`` (cross_entropy of ``logits``,
    a float64 leaf that requires grad), for the upstream ``grad`` (ones when None); None when the
    graph has no log_softmax or cannot be differentiated."""
    captured: list[Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = call()
            node = _find_node(out.grad_fn, "LogSoftmaxBackward")
            if node is None:
                return None
            node.register_prehook(lambda grads: captured.append(grads[0]))
            torch.autograd.grad(out, [logits], torch.ones_like(out) if grad is None else grad, allow_unused=True)
        except RuntimeError:
            return None
    return captured[0] if captured else None


def _finite(t: Tensor) -> Tensor:
    """No allowance where the terms are not finite (a NaN row is judged by its NaNs)."""
    return t.where(t.isfinite(), 0)


def gradient_terms(u: Tensor, logits: Tensor, class_dim: int) -> Tensor:
    """``T = |u| + p·Σ_c |u_c|`` for the gradient with respect to the (float64) logits."""
    u = u.abs()
    return _finite(u + logits.detach().softmax(class_dim) * u.sum(class_dim, keepdim=True))


def value_terms(u: Tensor, logits: Tensor, class_dim: int, reduced: bool) -> Tensor:
    """``Σ_c |u_c|·(|log p_c| + 1)`` per output element, for ``u`` taken with an upstream of
    ones: per row for reduction='none', over everything for a reduced loss. An ignored row
    (``u = 0``) with NaN logits adds nothing."""
    terms = _finite(u.abs() * (logits.detach().log_softmax(class_dim).abs() + 1))
    return terms.sum() if reduced else terms.sum(class_dim)


def float64_summation_factor(classes: int) -> float:
    """How much more than ``compare``'s float64 ``c`` (derived for sums over 2500 classes, about
    ``sqrt(2500)·eps`` apart in two summation orders) a sum over ``classes`` terms may differ:
    ``sqrt(classes / 2500)``, at least 1. torch's float64 log-sum over 16821 classes is about
    130 eps of its running total off."""
    return max(1.0, (classes / 2500) ** 0.5)
