"""The autograd Function of linear + cross-entropy: what to save, and which pass to run.

* Forward runs the block loop once. For a scalar reduction ('sum', 'mean') it also computes the
  wanted gradients in that same pass, for a unit upstream gradient, and keeps them on ctx; the
  backward then only scales them by the upstream gradient, in place. A second backward through
  the same graph (``retain_graph=True``) finds them gone and recomputes, so it stays correct.
* ``reduction='none'``, a second backward, the gradients of a probability target or of the
  class weights, and anything under torch.compile recompute the logits block by block in
  backward.
* When autograd records the backward (``create_graph=True``, ``torch.func.grad``), the backward
  is written with the differentiable reference formulas instead, so double backward works; that
  path materialises the logits, as the plain losses' double backward does.
* ``jvp`` gives forward-mode AD, a block at a time.

Saved: the inputs, the target and weights, the mean's denominator and the per-row stats. Never
anything of size N×C.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from ..kernels import reference
from . import chunked, ops
from .chunked import LossSpec


def _grad_rows(grad_out: Tensor, mode: str, denominator: Tensor | None, rows: tuple[int, int]) -> Tensor:
    """The upstream gradient of each row's loss, ``(N, D)``, from that of the result."""
    if mode == "none":
        return grad_out
    if mode == "mean":
        assert denominator is not None
        grad_out = grad_out / denominator
    return grad_out.expand(rows)


def _reduce(loss: Tensor, mode: str, denominator: Tensor | None) -> Tensor:
    if mode == "none":
        return loss
    total = loss.sum()
    if mode == "sum":
        return total
    assert denominator is not None
    return total / denominator


class LinearCrossEntropy(Function):
    """``reduce(cross_entropy(x2 @ w2.T + b1))`` over the rows, computed a block at a time.

    Returns the result (per-row losses ``(N, D)`` for 'none', a 0-dim tensor otherwise, in the
    accumulation dtype), the per-row stats, and the gradients forward precomputed (or None).
    """

    @staticmethod
    def forward(
        x2: Tensor,
        w2: Tensor,
        b1: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        denominator: Tensor | None,
        spec: LossSpec,
        mode: str,
        precompute: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, ...]:
        grad_rows = None
        if any(precompute):
            one = torch.ones((), dtype=reference.accumulation_dtype(spec.dtype), device=x2.device)
            grad_rows = _grad_rows(one, mode, denominator, (x2.shape[0], spec.inner))
        loss, stats, *grads = ops.forward(x2, w2, b1, target, weight, spec, grad_rows, precompute)
        # The precomputed gradients are outputs only so that setup_context can keep them.
        return (_reduce(loss, mode, denominator), stats, *grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        x2, w2, b1, target, weight, denominator, spec, mode, _ = inputs
        ctx.spec, ctx.mode, ctx.rows = spec, mode, (x2.shape[0], spec.inner)
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # Otherwise autograd hands backward zeros the size of each precomputed gradient output.
        ctx.set_materialize_grads(False)
        ctx.precomputed = list(output[2:]) if any(t is not None for t in output[2:]) else None
        ctx.save_for_backward(x2, w2, b1, target, weight, denominator, output[1])
        ctx.save_for_forward(x2, w2, b1, target, weight, denominator, output[1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, *_unused: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad_out is None:  # only the non-differentiable outputs were used
            return (None,) * 9
        x2, w2, b1, target, weight, denominator, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = (needs[0], needs[1], needs[2] and b1 is not None, needs[3] and ctx.spec.prob,
                  needs[4] and ctx.spec.prob and weight is not None)
        grad_rows = _grad_rows(grad_out, ctx.mode, denominator, ctx.rows)
        if torch.is_grad_enabled():
            grads = _differentiable_backward(grad_rows, x2, w2, b1, target, weight, ctx.spec, wanted)
        else:
            grads = _backward(ctx, grad_out, grad_rows, x2, w2, b1, target, weight, stats, wanted)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor | None, ...]:
        x2, w2, b1, target, weight, denominator, stats = ctx.saved_tensors
        rows = chunked.loss_tangent(x2, w2, b1, target, weight, stats, ctx.spec, tangents[:5])
        return _reduce(rows, ctx.mode, denominator), None, None, None, None


def _upstream_scale(grad_out: Tensor) -> Tensor | float:
    """What the precomputed gradients are multiplied by: the scalar upstream gradient, read on
    the host when it is a plain tensor, so that the usual ``loss.backward()`` (exactly 1) skips
    the multiply. That multiply reads and writes the whole weight gradient: about 1 GB for a
    Llama-3 head, 2.5 ms of an H200's time (measured) for nothing. The read is a device sync,
    which costs nothing here, as the backward has no other work to queue behind the forward's.
    Under torch.compile, a functorch transform or CUDA graph capture (where a sync is not
    allowed) the tensor itself is used."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(grad_out):
        return grad_out
    if grad_out.is_cuda and torch.cuda.is_current_stream_capturing():
        return grad_out
    return grad_out.item()


def _backward(ctx: Any, grad_out: Tensor, grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None,
              target: Tensor, weight: Tensor | None, stats: Tensor,
              wanted: tuple[bool, ...]) -> list[Tensor | None]:
    """First-order backward: scale what forward precomputed (once), recompute the rest."""
    grads: list[Tensor | None] = [None] * 5
    precomputed, ctx.precomputed = ctx.precomputed, None
    missing = list(wanted)
    if precomputed is not None:
        scale = _upstream_scale(grad_out)
        for i in range(3):
            if wanted[i] and precomputed[i] is not None:
                grads[i] = precomputed[i] if scale == 1.0 else precomputed[i].mul_(scale)
                missing[i] = False
    if any(missing):
        recomputed = ops.backward(grad_rows, x2, w2, b1, target, weight, stats, ctx.spec,
                                  (missing[0], missing[1], missing[2], missing[3], missing[4]))
        for i, g in enumerate(recomputed):
            if missing[i]:
                grads[i] = g
    # The weight and bias gradients may have been accumulated in float32 (chunked.weight_grad_dtype).
    if grads[1] is not None:
        grads[1] = chunked.narrowed(grads[1], w2.dtype)
    if grads[2] is not None and b1 is not None:
        grads[2] = grads[2].to(b1.dtype)
    if grads[4] is not None and weight is not None:
        grads[4] = grads[4].to(weight.dtype)
    return grads


def _differentiable_backward(grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor,
                             weight: Tensor | None, spec: LossSpec, wanted: tuple[bool, ...]) -> list[Tensor | None]:
    """The backward as differentiable torch ops (for double backward). Materialises the logits."""
    logits, tanh = chunked.soft_cap(torch.nn.functional.linear(x2, w2, b1), spec.softcap)
    x = logits.view(x2.shape[0], spec.num_classes, spec.inner).to(spec.dtype)
    lse = reference.row_stats(x)  # the row stats the reference formulas take
    grads: list[Tensor | None] = [None] * 5
    if spec.prob:
        g = reference.ce_prob_backward(grad_rows, x, target, weight, lse, spec.smoothing, False)
        if wanted[3]:
            grads[3] = reference.ce_prob_target_grad(grad_rows, x, weight, lse, spec.smoothing)
        if wanted[4]:
            grads[4] = reference.ce_prob_weight_grad(grad_rows, x, target, lse, spec.smoothing)
    else:
        g = reference.ce_backward(grad_rows, x, target, weight, lse, spec.ignore_index, spec.smoothing, False)
    flat = g.to(w2.dtype).reshape(x2.shape[0], -1)
    if tanh is not None:  # through the soft cap to the raw logits
        flat = flat * (1 - tanh * tanh)
    if wanted[0]:
        grads[0] = flat @ w2
    if wanted[1]:
        grads[1] = flat.t() @ x2
    if wanted[2]:
        grads[2] = flat.sum(0)
    return grads


def _without_jvp() -> type[Function]:
    """Dynamo refuses to trace a Function with a custom jvp (see ``fusedce._autograd``)."""
    return type("LinearCrossEntropy", (LinearCrossEntropy,), {"jvp": Function.jvp})


_Traced = _without_jvp()


def linear_cross_entropy(*args: Any) -> Tensor:
    """Apply the Function (its jvp-less variant while torch.compile traces); the result only."""
    function = _Traced if torch.compiler.is_compiling() else LinearCrossEntropy
    return function.apply(*args)[0]
