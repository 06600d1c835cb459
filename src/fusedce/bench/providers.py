"""The implementations compared: fusedce, torch eager, torch.compile, and peers when importable.

A provider maps an ``Inputs`` to the op's output (the 'mean' loss for cross_entropy; the
probabilities or log-probabilities for the softmaxes). ``backward`` then differentiates it: the
loss directly, the softmaxes against the workload's fixed random ``grad_out``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as fused
from . import linear
from .workloads import IGNORE_INDEX, MODES, Inputs, Workload, workloads

CROSS_ENTROPY_PROVIDERS = ("fusedce", "fusedce-inplace", "eager", "compile", "liger")
SOFTMAX_PROVIDERS = ("fusedce", "eager", "compile")
NAMES = (*CROSS_ENTROPY_PROVIDERS, *(p for p in linear.PROVIDERS if p not in CROSS_ENTROPY_PROVIDERS))
# With gradients off, the in-place variant is the plain one: it sits out no-grad-forward.
GRAD_ONLY = frozenset({"fusedce-inplace"})


def provider_names(op: str) -> tuple[str, ...]:
    """Every provider that can take part in ``op``'s workloads somewhere (Liger: CUDA, 2-D, when
    importable), without building any of them."""
    if op == linear.OP:
        return linear.PROVIDERS
    return CROSS_ENTROPY_PROVIDERS if op == "cross_entropy" else SOFTMAX_PROVIDERS


@dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[[Inputs], Tensor]
    # True when a call writes into the input (inplace_backward, Liger): the input is then
    # restored from Inputs.master before every timed call, outside the timer.
    overwrites_input: bool = False
    # Whether this provider takes part in no-grad-forward (the in-place variant is then
    # identical to the plain one).
    no_grad: bool = True

    def forward(self, inputs: Inputs) -> Tensor:
        return self.fn(inputs)

    @staticmethod
    def backward(out: Tensor, inputs: Inputs) -> None:
        out.backward(inputs.grad_out)  # None for a scalar loss


def cases(op: str) -> list[tuple[Workload, str, str]]:
    """(workload, mode, provider name) for every visible workload of ``op`` in the CPU table (the
    keys are the same on CUDA), every mode and every provider that can take part in it."""
    return [
        (w, mode, name)
        for w in workloads("cpu")
        if w.op == op and not w.hidden
        for mode in MODES
        for name in provider_names(op)
        if not (mode == "no-grad-forward" and name in GRAD_ONLY)
    ]


def _cross_entropy(impl: Callable[..., Tensor], **kwargs: Any) -> Callable[[Inputs], Tensor]:
    def call(inputs: Inputs) -> Tensor:
        return impl(inputs.x, inputs.target, ignore_index=IGNORE_INDEX, **kwargs)

    return call


def _softmax(impl: Callable[..., Tensor]) -> Callable[[Inputs], Tensor]:
    def call(inputs: Inputs) -> Tensor:
        return impl(inputs.x, dim=1)

    return call


def _compiled(impl: Callable[..., Tensor], dynamic: bool) -> Callable[..., Tensor]:
    # One compiled callable per (op, provider) list: dynamo caches a graph per shape and grad
    # mode under it, and the warm-up before each measurement pays for the compilation.
    return torch.compile(impl, dynamic=dynamic)


def _liger() -> Callable[..., Tensor] | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # a broken install counts as none
        return None
    loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def call(input: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        return loss(input, target)

    return call


def providers(workload: Workload, device: str, names: list[str] | None = None,
              dynamic_compile: bool = False) -> list[Provider]:
    """The providers for this workload on this device, in table order, filtered by ``names``.

    ``dynamic_compile`` compiles with dynamic shapes, so that a warm-up on a small shape also
    serves the real one (the memory probe needs that: a recompile there would count the
    compiler's own memory).
    """
    if names:
        unknown = set(names) - set(NAMES)
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(sorted(unknown))}: expected {', '.join(NAMES)}")
    wanted = set(names or NAMES)
    # Built only when wanted: torch.compile imports dynamo, which takes seconds.
    makers: dict[str, Callable[[], Provider | None]]
    if workload.op == linear.OP:
        makers = {name: _linear_maker(name, make) for name, make in linear.implementations(
            device, dynamic_compile).items()}
    elif workload.op == "cross_entropy":
        makers = {
            "fusedce": lambda: Provider("fusedce", _cross_entropy(fused.cross_entropy)),
            "fusedce-inplace": lambda: Provider(
                "fusedce-inplace", _cross_entropy(fused.cross_entropy, inplace_backward=True),
                overwrites_input=True, no_grad="fusedce-inplace" not in GRAD_ONLY),
            "eager": lambda: Provider("eager", _cross_entropy(F.cross_entropy)),
            "compile": lambda: Provider("compile", _cross_entropy(_compiled(F.cross_entropy, dynamic_compile))),
            "liger": lambda: _liger_provider(workload, device),
        }
    else:
        ours, theirs = getattr(fused, workload.op), getattr(F, workload.op)
        makers = {
            "fusedce": lambda: Provider("fusedce", _softmax(ours)),
            "eager": lambda: Provider("eager", _softmax(theirs)),
            "compile": lambda: Provider("compile", _softmax(_compiled(theirs, dynamic_compile))),
        }
    assert tuple(makers) == provider_names(workload.op)
    found = [maker() for name, maker in makers.items() if name in wanted]
    return [p for p in found if p is not None]


def _linear_maker(name: str, make: Callable[[], Callable[..., Tensor] | None]) -> Callable[[], Provider | None]:
    def maker() -> Provider | None:
        impl = make()
        return None if impl is None else Provider(name, linear.call_with(impl))

    return maker


def _liger_provider(workload: Workload, device: str) -> Provider | None:
    liger = _liger() if device == "cuda" and len(workload.shape) == 2 else None
    if liger is None:  # 2-D only; it writes the gradient into the input during forward
        return None
    return Provider("liger", _cross_entropy(liger), overwrites_input=True)
