"""``patch()``: route torch's cross-entropy family to fusedce inside a block, however it is spelled.

A ``TorchFunctionMode`` sees every torch call made in its thread while it is on the mode stack,
whatever name the caller holds: ``F.cross_entropy`` imported before the block, ``torch.softmax``,
``x.log_softmax(1)``, ``torch.special.softmax``, and the ``nn`` modules (built before the block or
not), which call ``F.*``. Nothing in torch is reassigned, so nothing needs restoring afterwards.

The routes are one table, ``_ROUTES``: torch's callable -> how its arguments reach fusedce.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as torch_functional
from torch.overrides import TorchFunctionMode

from . import functional

__all__ = ["patch"]

# The dtypes fusedce computes in; anything else (an integer or complex input, float8) goes to torch.
_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
# Tensor subclasses (DTensor, FakeTensor made by hand, masked or jagged tensors) bring their own
# semantics: only these plain types are routed.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
# Frames between a caller of F.softmax and fusedce's softmax inside the mode: F.softmax itself,
# torch.overrides.handle_torch_function, _PatchMode.__torch_function__ and the route. The
# implicit-dim warning is attributed that much further up, so that it names the caller's line.
_EXTRA_FRAMES = 4

Route = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _covered(input: Any, dtype: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether fusedce covers the call: an input computed in one of fusedce's dtypes, and every
    tensor argument a plain strided tensor (no subclass, no sparse or nested layout)."""
    if not isinstance(input, Tensor) or (input.dtype if dtype is None else dtype) not in _DTYPES:
        return False
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and (
            type(value) not in _PLAIN_TYPES or value.layout != torch.strided or value.is_nested
        ):
            return False
    return True


def _loss(fused: Callable[..., Any], takes_dtensor: bool = False) -> Route:
    """``F.cross_entropy``-like functions: fusedce's signature is torch's (Python has bound the
    arguments to it before the mode is called), so they pass through as they are.
    ``takes_dtensor``: fusedce handles a DTensor input itself (vocabulary-parallel
    cross-entropy, ``fusedce.distributed``), so that subclass is routed too."""

    def route(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        input = args[0] if args else kwargs.get("input")
        if _covered(input, None, args, kwargs) or (takes_dtensor and functional._is_dtensor(input)):
            return fused(*args, **kwargs)
        return func(*args, **kwargs)

    return route


def _functional_softmax(fused: Callable[..., Any]) -> Route:
    """``F.log_softmax(input, dim=None, _stacklevel=3, dtype=None)`` and ``F.softmax``: as they
    are, with ``_stacklevel`` moved up past the frames the mode adds (on the way to torch too)."""

    def route(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = dict(zip(("input", "dim", "_stacklevel", "dtype"), args, strict=False))
        bound.update(kwargs)
        level = bound.get("_stacklevel", 3)
        if type(level) is int:
            bound["_stacklevel"] = level + _EXTRA_FRAMES
        if _covered(bound.get("input"), bound.get("dtype"), args, kwargs):
            return fused(**bound)
        return func(**bound)

    return route


_ATEN_SOFTMAX_ARGUMENTS = {"input": 0, "dim": 1, "dtype": 2}.keys()


def _aten_softmax(fused: Callable[..., Any]) -> Route:
    """``torch.softmax(input, dim, dtype=None, *, out=None)``, ``Tensor.softmax(dim, dtype=None)``
    and ``torch.special.softmax(input, dim, dtype=None)``, likewise for log_softmax. torch's
    parser has already accepted the arguments; ``dim`` is required and never warns. ``out=`` and
    a named (``str``) dim go to torch."""

    def route(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = dict(zip(_ATEN_SOFTMAX_ARGUMENTS, args, strict=False))
        bound.update(kwargs)
        dtype = bound.get("dtype")
        if (
            bound.keys() <= _ATEN_SOFTMAX_ARGUMENTS  # no out=
            and type(bound.get("dim")) is int
            and (dtype is None or isinstance(dtype, torch.dtype))
            and _covered(bound.get("input"), dtype, args, kwargs)
        ):
            return fused(bound["input"], bound["dim"], dtype=dtype)
        return func(*args, **kwargs)

    return route


# torch's callable -> its route. Adding a function is one line here.
_ROUTES: dict[Callable[..., Any], Route] = {
    torch_functional.cross_entropy: _loss(functional.cross_entropy, takes_dtensor=True),
    torch_functional.linear_cross_entropy: _loss(functional.linear_cross_entropy),
    torch_functional.nll_loss: _loss(functional.nll_loss),
    torch_functional.log_softmax: _functional_softmax(functional.log_softmax),
    torch_functional.softmax: _functional_softmax(functional.softmax),
    torch.log_softmax: _aten_softmax(functional.log_softmax),
    torch.softmax: _aten_softmax(functional.softmax),
    Tensor.log_softmax: _aten_softmax(functional.log_softmax),
    Tensor.softmax: _aten_softmax(functional.softmax),
    torch.special.log_softmax: _aten_softmax(functional.log_softmax),
    torch.special.softmax: _aten_softmax(functional.softmax),
}


class _PatchMode(TorchFunctionMode):
    """Sees every torch call in its thread. torch pops the mode while ``__torch_function__`` runs,
    so the torch calls fusedce makes inside a route do not come back here."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        try:
            route = _ROUTES.get(func)
        except TypeError:  # an unhashable callable is not in the table
            route = None
        if route is None:
            return func(*args, **(kwargs or {}))
        return route(func, args, kwargs or {})


_local = threading.local()


@contextlib.contextmanager
def patch() -> Iterator[None]:
    """Route torch's cross-entropy family to fusedce for the duration of a block, in this thread.

    Inside the block these go to fusedce, with torch's exact semantics:

    - ``torch.nn.functional.cross_entropy``, ``nll_loss``, ``log_softmax`` and ``softmax``, under
      any name (``from torch.nn.functional import cross_entropy`` done before the block included);
    - ``torch.log_softmax``, ``torch.softmax``, ``torch.special.log_softmax``,
      ``torch.special.softmax``, ``Tensor.log_softmax`` and ``Tensor.softmax``;
    - ``torch.nn.functional.linear_cross_entropy`` and ``nn.LinearCrossEntropyLoss`` instances;
    - ``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.LogSoftmax`` and ``nn.Softmax`` instances,
      whenever they were built (their ``forward`` calls the functions above);
    - ``F.cross_entropy`` on a DTensor sharded on the class dim (vocabulary-parallel, see
      ``fusedce.distributed``), which torch only accepts inside ``loss_parallel()``.

    Calls fusedce does not cover go to torch unchanged: an input whose dtype (after ``dtype=``) is
    not float16, bfloat16, float32 or float64; any tensor argument of a subclass (``DTensor``
    outside ``cross_entropy``, ``FakeTensor``, jagged or masked tensors), or with a sparse or nested layout; ``out=``; a
    named dimension. Everything else in torch passes through the mode untouched, at the cost of a
    Python call and a dict look-up per torch call in the block.

    It is a context manager and a decorator (``@fusedce.patch()``). It nests: an inner block
    inside an outer one changes nothing. It acts on the current thread only (torch keeps the
    mode stack per thread): other threads keep torch's functions. Nothing in torch is modified,
    so torch is exactly as before once the block ends. Under ``torch.compile`` the mode is traced
    like any other, so a function compiled and called inside the block uses fusedce.
    """
    if getattr(_local, "depth", 0):
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    _local.depth = 1
    try:
        with _PatchMode():
            yield
    finally:
        _local.depth = 0
