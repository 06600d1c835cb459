"""The fused ops, registered with torch.library.

Registering them as operators (with fake kernels) is what lets torch.compile trace through the
autograd Functions without a graph break, lets FakeTensor propagate shapes, and lets
``torch.func.vmap`` batch them. Each call is sent to a kernel backend chosen from the tensor's
device (see ``kernels.backend_for``); the backends all implement ``kernels.reference``.

The Python functions at the bottom are what the autograd Functions call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .kernels import backend_for
from .kernels.reference import __file__ as reference_module_file
from .kernels.reference import accumulation_dtype

_lib = torch.library.Library("fusedce", "DEF")

# name -> schema. The trailing underscore marks the in-place backward: it writes into x.
_SCHEMAS = {
    "ce_forward": "(Tensor x, Tensor target, Tensor? weight, int ignore_index, float smoothing)"
    " -> (Tensor, Tensor)",
    "ce_backward": "(Tensor grad_loss, Tensor x, Tensor target, Tensor? weight, Tensor stats,"
    " int ignore_index, float smoothing) -> Tensor",
    "ce_backward_": "(Tensor grad_loss, Tensor(a!) x, Tensor target, Tensor? weight, Tensor stats,"
    " int ignore_index, float smoothing) -> ()",
    "ce_prob_forward": "(Tensor x, Tensor target, Tensor? weight, float smoothing) -> (Tensor, Tensor)",
    "ce_prob_backward": "(Tensor grad_loss, Tensor x, Tensor target, Tensor? weight, Tensor stats,"
    " float smoothing) -> Tensor",
    "ce_prob_backward_": "(Tensor grad_loss, Tensor(a!) x, Tensor target, Tensor? weight, Tensor stats,"
    " float smoothing) -> ()",
    # Index-target cross_entropy with the LLM extras (z-loss, logit soft-capping; see
    # reference.ce_extras_forward). Separate ops rather than new arguments on ce_forward and
    # ce_backward, so that the default call's ops, schemas and kernels stay exactly as they were.
    "ce_extras_forward": "(Tensor x, Tensor target, Tensor? weight, int ignore_index, float smoothing,"
    " float z_loss, float softcap) -> (Tensor, Tensor)",
    "ce_extras_backward": "(Tensor grad_loss, Tensor x, Tensor target, Tensor? weight, Tensor stats,"
    " int ignore_index, float smoothing, float z_loss, float softcap) -> Tensor",
    "ce_extras_backward_": "(Tensor grad_loss, Tensor(a!) x, Tensor target, Tensor? weight, Tensor stats,"
    " int ignore_index, float smoothing, float z_loss, float softcap) -> ()",
    # The plain (N, C) 'mean'/'sum' loss in one op (functional's fast path): the scalar loss, the
    # per-row lse and the denominator; the backward takes the last two back.
    "ce_reduced_forward": "(Tensor x, Tensor target, int ignore_index, bool mean) -> (Tensor, Tensor, Tensor)",
    "ce_reduced_backward": "(Tensor grad_out, Tensor x, Tensor target, Tensor lse, Tensor denominator,"
    " int ignore_index) -> Tensor",
    "nll_forward": "(Tensor x, Tensor target, Tensor? weight, int ignore_index) -> Tensor",
    "nll_backward": "(Tensor grad_loss, Tensor target, Tensor? weight, int ignore_index,"
    " SymInt num_classes, ScalarType dtype) -> Tensor",
    "log_softmax_forward": "(Tensor x) -> Tensor",
    "log_softmax_backward": "(Tensor grad_out, Tensor out) -> Tensor",
    "softmax_forward": "(Tensor x) -> Tensor",
    "softmax_backward": "(Tensor grad_out, Tensor out) -> Tensor",
}


def _eager_kernel(name: str) -> Callable[..., Any]:
    """The real kernel: the backend for the call's device runs its function of the same name.
    Every op's first argument is a tensor on that device. The backward ops take ``inplace``;
    their trailing-underscore forms are the in-place ones, which return nothing."""
    function = name.removesuffix("_")
    inplace = name.endswith("_")
    with_inplace = ("ce_backward", "ce_prob_backward", "ce_extras_backward")
    extra: tuple[bool, ...] = (inplace,) if function in with_inplace else ()

    def run(*args: Any) -> Any:
        backend = backend_for(args[0].device)
        kernel = getattr(backend, function, None)
        if kernel is None:  # an op that only some backends fuse
            return _COMPOSITES[function](backend, *args)
        result = kernel(*args, *extra)
        return None if inplace else result

    return run


# ---- composites: the ops a backend may leave out, built from its reference functions ---------
# The C++ backend fuses these; the others compute the same thing from ce_forward/ce_backward and
# torch ops, which is also the definition the fused version follows.


def _ce_reduced_forward(backend: Any, x: Tensor, target: Tensor, ignore_index: int, mean: bool) -> Any:
    loss, lse = backend.ce_forward(x.unsqueeze(2), target.unsqueeze(1), None, ignore_index, 0.0)
    total = loss.sum()
    denominator = (target != ignore_index).sum().to(total.dtype) if mean else total.new_ones(())
    return (total / denominator).to(x.dtype), lse, denominator


def _ce_reduced_backward(
    backend: Any, grad_out: Tensor, x: Tensor, target: Tensor, lse: Tensor, denominator: Tensor, ignore_index: int
) -> Tensor:
    grad_rows = (grad_out.to(denominator.dtype) / denominator).expand(x.shape[0], 1)
    grad = backend.ce_backward(grad_rows, x.unsqueeze(2), target.unsqueeze(1), None, lse, ignore_index, 0.0, False)
    return grad.squeeze(2)


_COMPOSITES: dict[str, Callable[..., Any]] = {
    "ce_reduced_forward": _ce_reduced_forward,
    "ce_reduced_backward": _ce_reduced_backward,
}


# ---- fake kernels: shapes and dtypes only -------------------------------------------------


def _rows_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[2]), dtype=accumulation_dtype(x.dtype))


def _fake_ce_forward(x: Tensor, *_: Any) -> tuple[Tensor, Tensor]:
    """The per-row loss, and the (outer, inner, 2) row stats: max and log Σ exp(x - max)."""
    stats = x.new_empty((x.shape[0], x.shape[2], 2), dtype=accumulation_dtype(x.dtype))
    return _rows_like(x), stats


def _fake_grad_like_x(grad_loss: Tensor, x: Tensor, *_: Any) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_ce_reduced_forward(x: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(x.dtype)
    lse = _fake_ce_forward(x.unsqueeze(2))[1]
    return x.new_empty((), dtype=x.dtype), lse, x.new_empty((), dtype=acc)


def _fake_ce_reduced_backward(grad_out: Tensor, x: Tensor, *_: Any) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_none(*_: Any) -> None:
    return None


def _fake_nll_forward(x: Tensor, *_: Any) -> Tensor:
    return _rows_like(x)


def _fake_nll_backward(
    grad_loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, num_classes: int, dtype: Any
) -> Tensor:
    return target.new_empty((target.shape[0], num_classes, target.shape[1]), dtype=dtype)


def _fake_like_first(x: Tensor, *_: Any) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_like_second(grad: Tensor, out: Tensor) -> Tensor:
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


_FAKES: dict[str, Callable[..., Any]] = {
    "ce_forward": _fake_ce_forward,
    "ce_backward": _fake_grad_like_x,
    "ce_backward_": _fake_none,
    "ce_extras_forward": _fake_ce_forward,
    "ce_extras_backward": _fake_grad_like_x,
    "ce_extras_backward_": _fake_none,
    "ce_prob_forward": _fake_ce_forward,
    "ce_prob_backward": _fake_grad_like_x,
    "ce_prob_backward_": _fake_none,
    "ce_reduced_forward": _fake_ce_reduced_forward,
    "ce_reduced_backward": _fake_ce_reduced_backward,
    "nll_forward": _fake_nll_forward,
    "nll_backward": _fake_nll_backward,
    "log_softmax_forward": _fake_like_first,
    "log_softmax_backward": _fake_like_second,
    "softmax_forward": _fake_like_first,
    "softmax_backward": _fake_like_second,
}


# ---- vmap: run the op once per batch entry ------------------------------------------------


def _vmap_by_loop(op: Callable[..., Any]) -> Callable[..., Any]:
    """A batching rule that slices every batched argument and stacks the results.

    Correct for every op and every combination of batched arguments (a per-sample weight
    included); it costs one kernel launch per batch entry, which is what vmap over a loss
    usually amounts to anyway (per-sample gradients of small inputs).
    """

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, Any]:
        def pick(i: int) -> list[Any]:
            return [a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=False)]

        results = [op(*pick(i)) for i in range(info.batch_size)]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(r) for r in zip(*results, strict=False)), (0,) * len(results[0])
        return torch.stack(results), 0

    return rule


# ---- the ops' contract version: the overload name of every op ------------------------------


def contract_version(sources: tuple[bytes, ...]) -> str:
    """A short hash of what a compiled graph bakes in about these ops: their schemas and their
    fake kernels (output shapes, strides and dtypes). Pass the source of the modules that define
    them."""
    digest = hashlib.sha256()
    for part in sources:
        digest.update(hashlib.sha256(part).digest())
    return "v" + digest.hexdigest()[:12]


def _contract_sources() -> tuple[bytes, ...]:
    """This module's source (the schemas and the fakes) and reference's (accumulation_dtype);
    the package version where the source cannot be read (a zipped install)."""
    try:
        return tuple(Path(module).read_bytes() for module in (__file__, reference_module_file))
    except OSError:
        return (_package_version().encode(),)


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fusedce")
    except metadata.PackageNotFoundError:
        return "unknown"


# Every op is defined under this overload name rather than ``default``. Inductor's FX graph cache
# (on disk, shared across processes and fusedce versions) keys a compiled graph on its code, which
# names each op but says nothing about its fake kernel; the compiled graph keeps the output strides
# the fake gave at the time. Without a version in that code, a graph compiled before the stats
# changed from (outer, inner) to (outer, inner, 2) is reused afterwards and fails compiling its
# backward ("mismatch in length of strides and shape"). Callers use the packet
# (``torch.ops.fusedce.ce_forward``), which resolves the one overload.
CONTRACT = contract_version(_contract_sources())

for _name, _schema in _SCHEMAS.items():
    _lib.define(f"{_name}.{CONTRACT}{_schema}")
    _qualified = f"fusedce::{_name}.{CONTRACT}"
    _lib.impl(f"{_name}.{CONTRACT}", _eager_kernel(_name), "CompositeExplicitAutograd")
    torch.library.register_fake(_qualified, _FAKES[_name], lib=_lib)
    if not _name.endswith("_"):
        torch.library.register_vmap(_qualified, _vmap_by_loop(getattr(torch.ops.fusedce, _name)), lib=_lib)



class _Ops:
    """The ops as the autograd Functions call them.

    On plain tensors in eager mode a call goes straight to the backend: the dispatcher round
    trip into Python costs more than a small loss's whole kernel. Anything else (torch.compile,
    FakeTensor and other subclasses, meta tensors, functorch transforms, a TorchDispatchMode such
    as a FLOP counter) goes through the registered torch.library op, which is what those
    mechanisms see (meta tensors get the fake kernel).
    """

    def __init__(self) -> None:
        for name in _SCHEMAS:
            setattr(self, name, _direct_or_registered(name))


def _direct_or_registered(name: str) -> Callable[..., Any]:
    direct = _eager_kernel(name)
    registered = getattr(torch.ops.fusedce, name)

    def call(*args: Any) -> Any:
        # is_compiling comes first: Dynamo cannot trace the dispatch-stack query.
        if (
            not torch.compiler.is_compiling()
            and type(args[0]) is Tensor
            and not args[0].is_meta
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
        ):
            return direct(*args)
        return registered(*args)

    call.__name__ = name
    return call


ops: Any = _Ops()
