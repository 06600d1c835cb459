"""The chunked linear + cross-entropy passes, registered with torch.library.

As for the plain losses (``fusedce._ops``), registering them as operators with fake kernels is
what lets ``torch.compile(fullgraph=True)`` trace the autograd Function without a graph break:
the compiler sees one opaque op per pass, never the block loop. In eager mode on plain tensors
a call skips the dispatcher and runs the loop directly.

An op cannot return an optional tensor, so a gradient that was not asked for comes back as an
empty tensor; ``forward`` and ``backward`` below turn those into ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import chunked
from .chunked import LossSpec

_lib = torch.library.Library("fusedce", "FRAGMENT")

_SPEC = "int num_classes, int inner, bool prob, int ignore_index, float smoothing, ScalarType dtype, int chunk"
_FIVE = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_SCHEMAS = {
    "linear_ce_forward": f"(Tensor x2, Tensor w2, Tensor? b1, Tensor target, Tensor? weight, {_SPEC},"
    f" Tensor? grad_rows, bool[] wanted) -> {_FIVE}",
    "linear_ce_backward": f"(Tensor grad_rows, Tensor x2, Tensor w2, Tensor? b1, Tensor target, Tensor? weight,"
    f" Tensor stats, {_SPEC}, bool[] wanted) -> {_FIVE}",
}


def _spec(args: tuple[Any, ...]) -> LossSpec:
    return LossSpec(*args)


def _spec_args(spec: LossSpec) -> tuple[Any, ...]:
    return (spec.num_classes, spec.inner, spec.prob, spec.ignore_index, spec.smoothing, spec.dtype, spec.chunk)


def _nothing(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _or_nothing(values: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor, ...]:
    return tuple(_nothing(like) if v is None else v for v in values)


def _forward_kernel(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None,
                    *rest: Any) -> tuple[Tensor, ...]:
    spec, grad_rows, wanted = _spec(rest[:7]), rest[7], tuple(rest[8])
    loss, stats, *grads = chunked.forward(x2, w2, b1, target, weight, spec, grad_rows, wanted)
    return (loss, stats, *_or_nothing(tuple(grads), x2))


def _backward_kernel(grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor,
                     weight: Tensor | None, stats: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    spec, wanted = _spec(rest[:7]), tuple(rest[7])
    grads = chunked.backward(grad_rows, x2, w2, b1, target, weight, stats, spec, wanted)
    return _or_nothing(grads, x2)


# ---- fake kernels: shapes and dtypes only --------------------------------------------------


def _fake_gradients(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None,
                    spec: LossSpec, wanted: tuple[bool, ...]) -> list[Tensor]:
    acc = chunked.weight_grad_dtype(w2)
    shapes = [
        (x2.shape, x2.dtype),
        (w2.shape, acc),
        ((w2.shape[0],), acc),
        (target.shape, spec.dtype),
        (() if weight is None else weight.shape, chunked.accumulation_dtype(spec.dtype)),
    ]
    present = [True, True, b1 is not None, spec.prob, weight is not None and spec.prob]
    out = []
    for i, want in enumerate(wanted):
        shape, dtype = shapes[i]
        out.append(x2.new_empty(shape, dtype=dtype) if want and present[i] else _nothing(x2))
    return out


def _fake_forward(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None,
                  *rest: Any) -> tuple[Tensor, ...]:
    spec, grad_rows, wanted = _spec(rest[:7]), rest[7], tuple(rest[8])
    # The per-row results have whatever shape the fused kernel's own fake gives one block of all
    # the rows (a fake tensor: nothing is allocated).
    logits = x2.new_empty((x2.shape[0], spec.num_classes, spec.inner), dtype=spec.dtype)
    if spec.prob:
        loss, stats = torch.ops.fusedce.ce_prob_forward(logits, target, weight, spec.smoothing)
    else:
        loss, stats = torch.ops.fusedce.ce_forward(logits, target, weight, spec.ignore_index, spec.smoothing)
    if grad_rows is None:
        wanted = (False, False, False)
    grads = _fake_gradients(x2, w2, b1, target, weight, spec, (*wanted, False, False))[:3]
    return (loss, stats, *grads)


def _fake_backward(grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor,
                   weight: Tensor | None, stats: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    spec, wanted = _spec(rest[:7]), tuple(rest[7])
    return tuple(_fake_gradients(x2, w2, b1, target, weight, spec, wanted))


_KERNELS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "linear_ce_forward": (_forward_kernel, _fake_forward),
    "linear_ce_backward": (_backward_kernel, _fake_backward),
}

for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _KERNELS[_name][0], "CompositeExplicitAutograd")
    torch.library.register_fake(f"fusedce::{_name}", _KERNELS[_name][1], lib=_lib)


def _direct(x: Tensor) -> bool:
    """Plain eager tensors skip the dispatcher (see ``fusedce._ops._Ops``)."""
    return (
        not torch.compiler.is_compiling()
        and type(x) is Tensor
        and not x.is_meta
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def forward(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, weight: Tensor | None, spec: LossSpec,
            grad_rows: Tensor | None, wanted: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """``chunked.forward`` through the registered op when something is tracing."""
    if _direct(x2):
        return chunked.forward(x2, w2, b1, target, weight, spec, grad_rows, wanted)
    loss, stats, *grads = torch.ops.fusedce.linear_ce_forward(
        x2, w2, b1, target, weight, *_spec_args(spec), grad_rows, list(wanted))
    present = (True, True, b1 is not None)
    return (loss, stats, *(g if grad_rows is not None and want and p else None
                          for g, want, p in zip(grads, wanted, present, strict=True)))


def backward(grad_rows: Tensor, x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor,
             weight: Tensor | None, stats: Tensor, spec: LossSpec,
             wanted: tuple[bool, bool, bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """``chunked.backward`` through the registered op when something is tracing."""
    if _direct(x2):
        return chunked.backward(grad_rows, x2, w2, b1, target, weight, stats, spec, wanted)
    grads = torch.ops.fusedce.linear_ce_backward(
        grad_rows, x2, w2, b1, target, weight, stats, *_spec_args(spec), list(wanted))
    present = (True, True, b1 is not None, spec.prob, weight is not None and spec.prob)
    return tuple(g if want and p else None for g, want, p in zip(grads, wanted, present, strict=True))
