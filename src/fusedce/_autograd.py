"""The autograd Functions. Their only job is ctx: what to save, and which op to call.

All take and return tensors in canonical form (see ``_canonical``). Three rules hold for each:

* First-order backward calls the fused op, which reads the saved input once.
* When autograd records the backward itself (``create_graph=True``, ``torch.func.grad``), the
  backward is computed with the differentiable reference formulas instead, so double backward
  works; the saved row stats (max and log Σ exp(x - max)) are then recomputed from the input so
  that they are part of the graph.
* ``jvp`` gives forward-mode AD, and ``generate_vmap_rule`` lets ``torch.func.vmap`` batch the
  whole Function through the ops' batching rules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from ._ops import ops
from .kernels import reference


def _recording_backward() -> bool:
    """True when autograd is building a graph of the backward (double backward)."""
    return torch.is_grad_enabled()


def _refuse_inplace_double_backward() -> None:
    raise RuntimeError(
        "fusedce: inplace_backward=True writes the gradient over the logits, so it cannot be "
        "differentiated twice (create_graph=True or torch.func transforms); use inplace_backward=False"
    )


def _mark_overwritten(x: Tensor) -> None:
    """Bump the logits' version counter after writing the gradient over them, so that a second
    backward through a graph that saved them fails loudly instead of reading the gradient."""
    torch.autograd.graph.increment_version(x)


class CrossEntropy(Function):
    """Fused log-softmax + NLL for index targets, with weight, ignore_index and smoothing.

    Returns the per-row loss and the row stats (``reference.row_stats``: max and log Σ exp(x - max),
    kept apart so that the backward stays shift-invariant); only those are saved, never
    log-probabilities.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        smoothing: float,
        inplace_backward: bool,
    ) -> tuple[Tensor, Tensor]:
        return ops.ce_forward(x, target, weight, ignore_index, smoothing)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, target, weight, ctx.ignore_index, ctx.smoothing, ctx.inplace_backward = inputs
        stats = output[1]
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled (rows, 2) gradient for the stats
        ctx.save_for_backward(x, target, weight, stats)
        ctx.save_for_forward(x, target, weight, stats)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _grad_stats: Tensor | None) -> tuple[Tensor | None, ...]:
        x, target, weight, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad_loss is None:  # None: only the stats were used
            return (None,) * 6
        args = (target, weight)
        consts = (ctx.ignore_index, ctx.smoothing)
        if _recording_backward():
            if ctx.inplace_backward:
                _refuse_inplace_double_backward()
            grad = reference.ce_backward(grad_loss, x, *args, reference.row_stats(x), *consts, False)
        elif ctx.inplace_backward:
            ops.ce_backward_(grad_loss, x, *args, stats, *consts)
            _mark_overwritten(x)
            grad = x
        else:
            grad = ops.ce_backward(grad_loss, x, *args, stats, *consts)
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor | None, *_: Any) -> tuple[Tensor | None, None]:
        x, target, weight, stats = ctx.saved_tensors
        if x_tangent is None:
            return None, None
        return reference.ce_jvp(x, target, weight, stats, ctx.ignore_index, ctx.smoothing, x_tangent), None


class CrossEntropyExtras(Function):
    """CrossEntropy with the LLM extras: a z-loss coefficient and a logit soft-cap (0.0 for
    none). The stats it returns and saves are those of the capped logits; the backward
    recomputes the cap from the saved input. A Function of its own so that CrossEntropy, the
    default call's, is untouched."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        smoothing: float,
        z_loss: float,
        softcap: float,
        inplace_backward: bool,
    ) -> tuple[Tensor, Tensor]:
        return ops.ce_extras_forward(x, target, weight, ignore_index, smoothing, z_loss, softcap)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, target, weight, ignore_index, smoothing, z_loss, softcap, ctx.inplace_backward = inputs
        ctx.consts = (ignore_index, smoothing, z_loss, softcap)
        stats = output[1]
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled (rows, 2) gradient for the stats
        ctx.save_for_backward(x, target, weight, stats)
        ctx.save_for_forward(x, target, weight, stats)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _grad_stats: Tensor | None) -> tuple[Tensor | None, ...]:
        x, target, weight, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad_loss is None:  # None: only the stats were used
            return (None,) * 8
        ignore_index, smoothing, z_loss, softcap = ctx.consts
        if _recording_backward():
            if ctx.inplace_backward:
                _refuse_inplace_double_backward()
            stats = reference.row_stats(reference.softcapped(x, softcap))
            grad = reference.ce_extras_backward(
                grad_loss, x, target, weight, stats, ignore_index, smoothing, z_loss, softcap, False
            )
        elif ctx.inplace_backward:
            ops.ce_extras_backward_(grad_loss, x, target, weight, stats, ignore_index, smoothing, z_loss, softcap)
            _mark_overwritten(x)
            grad = x
        else:
            grad = ops.ce_extras_backward(grad_loss, x, target, weight, stats, ignore_index, smoothing, z_loss, softcap)
        return grad, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor | None, *_: Any) -> tuple[Tensor | None, None]:
        x, target, weight, stats = ctx.saved_tensors
        if x_tangent is None:
            return None, None
        ignore_index, smoothing, z_loss, softcap = ctx.consts
        return reference.ce_extras_jvp(x, target, weight, stats, ignore_index, smoothing, z_loss, softcap,
                                       x_tangent), None


class CrossEntropyReduced(Function):
    """CrossEntropy followed by its 'mean' or 'sum', in one op each way: functional's fast path for
    the plain (N, C) call with int64 targets, no weight and no smoothing.

    The values are CrossEntropy's and the reduction's (the op computes the same per-row loss, sum
    and division); what it saves is the reduction's own ops and autograd nodes, most of a small
    loss's time. Returns (loss, lse, denominator); the last two are saved for the backward. Only
    plain eager tensors reach it (functional checks): torch.compile, vmap and the other functorch
    transforms take the general path.
    """

    @staticmethod
    def forward(x: Tensor, target: Tensor, ignore_index: int, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
        return ops.ce_reduced_forward(x, target, ignore_index, mean)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, target, ctx.ignore_index, _mean = inputs
        _loss, lse, denominator = output
        ctx.mark_non_differentiable(lse, denominator)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for lse and denominator
        ctx.save_for_backward(x, target, lse, denominator)
        ctx.save_for_forward(x, target, lse, denominator)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, None, None, None]:
        x, target, lse, denominator = ctx.saved_tensors
        if grad_out is None:  # gradients are not materialised (setup_context)
            return None, None, None, None
        if not _recording_backward():
            return ops.ce_reduced_backward(grad_out, x, target, lse, denominator, ctx.ignore_index), None, None, None
        # Double backward: CrossEntropy's differentiable formulas, on the canonical views.
        grad_rows = (grad_out.to(denominator.dtype) / denominator).expand(x.shape[0], 1)
        x3, rows = x.unsqueeze(2), target.unsqueeze(1)
        grad = reference.ce_backward(grad_rows, x3, rows, None, reference.row_stats(x3), ctx.ignore_index, 0.0, False)
        return grad.squeeze(2), None, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor | None, *_: Any) -> tuple[Tensor | None, None, None]:
        x, target, lse, denominator = ctx.saved_tensors
        if x_tangent is None:
            return None, None, None
        rows = reference.ce_jvp(x.unsqueeze(2), target.unsqueeze(1), None, lse, ctx.ignore_index, 0.0,
                                x_tangent.unsqueeze(2))
        return (rows.sum() / denominator).to(x.dtype), None, None


class CrossEntropyProb(Function):
    """Fused log-softmax + cross-entropy against class probabilities.

    Differentiable with respect to the input, the target and the weight. The caller has already
    promoted the three to one dtype.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, target: Tensor, weight: Tensor | None, smoothing: float, inplace_backward: bool
    ) -> tuple[Tensor, Tensor]:
        return ops.ce_prob_forward(x, target, weight, smoothing)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, target, weight, ctx.smoothing, ctx.inplace_backward = inputs
        stats = output[1]
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled (rows, 2) gradient for the stats
        ctx.save_for_backward(x, target, weight, stats)
        ctx.save_for_forward(x, target, weight, stats)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _grad_stats: Tensor | None) -> tuple[Tensor | None, ...]:
        x, target, weight, stats = ctx.saved_tensors
        if grad_loss is None:  # only the stats were used
            return (None,) * 5
        eps = ctx.smoothing
        recording = _recording_backward()
        if recording:
            if ctx.inplace_backward:
                _refuse_inplace_double_backward()
            stats = reference.row_stats(x)
        # The target and weight gradients read x, so they come before an in-place input gradient.
        grad_target = grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_target = reference.ce_prob_target_grad(grad_loss, x, weight, stats, eps)
        if ctx.needs_input_grad[2]:
            grad_weight = reference.ce_prob_weight_grad(grad_loss, x, target, stats, eps)
        if ctx.needs_input_grad[0]:
            if recording:
                grad_x = reference.ce_prob_backward(grad_loss, x, target, weight, stats, eps, False)
            elif ctx.inplace_backward:
                ops.ce_prob_backward_(grad_loss, x, target, weight, stats, eps)
                _mark_overwritten(x)
                grad_x = x
            else:
                grad_x = ops.ce_prob_backward(grad_loss, x, target, weight, stats, eps)
        return grad_x, grad_target, grad_weight, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor | None, target_tangent: Tensor | None, weight_tangent: Tensor | None,
            *_: Any) -> tuple[Tensor, None]:
        x, target, weight, stats = ctx.saved_tensors
        tangents = (x_tangent, target_tangent, weight_tangent)
        return reference.ce_prob_jvp(x, target, weight, stats, ctx.smoothing, tangents), None


class NllLoss(Function):
    """Per-row ``-w[t]·x[t]``. Saves the target and weight only: the gradient does not depend on x."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
        return ops.nll_forward(x, target, weight, ignore_index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, target, weight, ctx.ignore_index = inputs
        ctx.num_classes, ctx.dtype = x.shape[1], x.dtype
        ctx.save_for_backward(target, weight)
        ctx.save_for_forward(target, weight)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        target, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        args = (grad_loss, target, weight, ctx.ignore_index, ctx.num_classes, ctx.dtype)
        backward = reference.nll_backward if _recording_backward() else ops.nll_backward
        return backward(*args), None, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor | None, *_: Any) -> Tensor | None:
        target, weight = ctx.saved_tensors
        return None if x_tangent is None else reference.nll_jvp(target, weight, ctx.ignore_index, x_tangent)


def _output_saving_function(name: str) -> type[Function]:
    """The Function for log_softmax or softmax over dim 1 of the canonical form. It saves its
    output only, as torch does: the backward and the jvp are functions of the output alone."""
    forward_op, backward_op = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
    # Double backward differentiates torch's own backward op, so it uses torch's derivative
    # formulas, evaluated in the output's dtype where torch evaluates them. Differentiating the
    # float32 reference formula instead rounds the half-precision intermediates elsewhere, and
    # gives a different result (by about an ulp of float16) for dtype=torch.float16.
    aten_backward = getattr(torch, f"_{name}_backward_data")

    def differentiable_backward(grad_out: Tensor, out: Tensor) -> Tensor:
        return aten_backward(grad_out, out, 1, out.dtype)

    output_jvp = getattr(reference, f"{name}_jvp")

    class OutputSaving(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor) -> Tensor:
            return forward_op(x)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            ctx.save_for_backward(output)
            ctx.save_for_forward(output)

        @staticmethod
        def backward(ctx: Any, grad_out: Tensor) -> Tensor:
            (out,) = ctx.saved_tensors
            backward = differentiable_backward if _recording_backward() else backward_op
            return backward(grad_out, out)

        @staticmethod
        def jvp(ctx: Any, x_tangent: Tensor) -> Tensor:
            (out,) = ctx.saved_tensors
            return output_jvp(out, x_tangent)

    OutputSaving.__name__ = OutputSaving.__qualname__ = "".join(p.title() for p in name.split("_"))
    return OutputSaving


LogSoftmax = _output_saving_function("log_softmax")
Softmax = _output_saving_function("softmax")


class FailInBackward(Function):
    """Identity in the forward; raises in the backward (to reproduce a torch quirk)."""

    @staticmethod
    def forward(x: Tensor, message: str) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        raise RuntimeError(ctx.message)


def fail_in_backward(x: Tensor, message: str) -> Tensor:
    return FailInBackward.apply(x, message)


def _without_jvp(function: type[Function]) -> type[Function]:
    """The same Function minus its jvp. Dynamo refuses to trace a Function that defines a custom
    jvp (a graph break), and forward-mode AD does not apply inside a compiled graph anyway."""
    return type(function.__name__, (function,), {"jvp": Function.jvp})


def _entry_point(function: type[Function]) -> Any:
    """How functional applies ``function``.

    In eager mode: ``Function.apply`` without its per-call ``inspect.signature`` binding of
    default arguments (tens of microseconds, the largest cost of a small loss). Our callers pass
    every argument positionally, so there is nothing to bind; the C apply is what remains.
    functorch transforms, and tensors that escaped one, take the full apply.

    While torch.compile traces: the jvp-less variant through the ordinary apply (Dynamo follows
    a plain conditional on is_compiling, but not the C apply).
    """
    traced = _without_jvp(function)
    fast = super(Function, function).apply  # type: ignore[misc]
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor

    def apply(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return traced.apply(*args)
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        for a in args:
            if isinstance(a, Tensor) and wrapped(a):
                return function.apply(*args)
        return fast(*args)

    return apply


# The entry points functional calls.
cross_entropy = _entry_point(CrossEntropy)
cross_entropy_extras = _entry_point(CrossEntropyExtras)
# The C apply itself: functional calls it only after checking that the call is a plain eager one.
cross_entropy_reduced = super(Function, CrossEntropyReduced).apply
cross_entropy_prob = _entry_point(CrossEntropyProb)
nll_loss = _entry_point(NllLoss)
log_softmax = _entry_point(LogSoftmax)
softmax = _entry_point(Softmax)
