"""Run one case through a candidate and through torch, and say how they differ.

Values and gradients in float64 must match torch closely. In lower precision the rule is the one
from ml-cross-entropy: our error against a float64 ground truth may be no worse than torch's own
error in the same dtype, plus a margin. All margins live in ``TOLERANCES``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grid import Case, Inputs, build_inputs, seed_of


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``err_ours <= factor * err_torch + atol + rtol * max|truth|``; in float64,
    where torch is the truth, when ``|ours - torch| <= atol + rtol * |torch|`` elementwise."""

    factor: float
    atol: float
    rtol: float


TOLERANCES = {
    torch.float64: Tolerance(factor=0.0, atol=1e-12, rtol=1e-10),
    torch.float32: Tolerance(factor=2.0, atol=1e-6, rtol=2e-6),
    torch.bfloat16: Tolerance(factor=1.0, atol=1e-3, rtol=4e-3),
    torch.float16: Tolerance(factor=1.0, atol=1e-4, rtol=1e-3),
}


@dataclass
class Outcome:
    """What one call did: its value, gradients, warnings, error, and whether it mutated inputs."""

    value: Any = None
    grads: list[Tensor | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    backward_error: str | None = None
    mutated: bool = False


def _describe(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _upstream(case: Case, out: Tensor) -> Tensor:
    """A random upstream gradient. It is rounded through the case's dtype, so the candidate,
    torch and the float64 truth all see the same values."""
    gen = torch.Generator().manual_seed(seed_of(case) ^ 0x5EED)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return g.to(case.dtype).to(out.dtype).to(out.device)


def run(fn: Callable[..., Any], case: Case, inputs: Inputs) -> Outcome:
    """Call ``fn`` on the inputs, then differentiate with a random upstream gradient."""
    before = [t.detach().clone() for t in inputs.tensors()]
    outcome = Outcome()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = inputs.call(fn)
        except Exception as exc:
            outcome.error = _describe(exc)
            out = None
        differentiable = inputs.differentiable()
        if isinstance(out, Tensor) and out.requires_grad and differentiable:
            try:
                outcome.grads = list(
                    torch.autograd.grad(out, differentiable, _upstream(case, out), allow_unused=True)
                )
            except Exception as exc:
                outcome.backward_error = _describe(exc)
    # fusedce's own notices (a backend falling back) are not part of torch's behaviour.
    outcome.warnings = [
        f"{w.category.__name__}: {w.message}" for w in caught if not str(w.message).startswith("fusedce:")
    ]
    outcome.value = out.detach() if isinstance(out, Tensor) else out
    outcome.mutated = any(
        not torch.equal(b.nan_to_num(), t.detach().nan_to_num()) for b, t in zip(before, inputs.tensors(), strict=False)
    )
    return outcome


# Backward errors of torch that depend only on the input's memory layout. A candidate that
# computes the gradient instead is compared with torch's result for a contiguous input.
TORCH_LAYOUT_BUGS = {
    # nll_loss2d's CPU backward, for a channels-last (N, C, H, W) input.
    "RuntimeError: grad_input must be contiguous",
}


def _contiguous(inputs: Inputs) -> Inputs:
    def dense(t: Any) -> Any:
        if isinstance(t, Tensor):
            return t.detach().contiguous().requires_grad_(t.requires_grad)
        return t

    return Inputs(dense(inputs.input), dense(inputs.target), {k: dense(v) for k, v in inputs.kwargs.items()})


def _as_float64(inputs: Inputs) -> Inputs:
    """The same values with every floating tensor in float64 (the ground truth's inputs)."""

    def up(t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.detach().double().requires_grad_(t.requires_grad)
        return t

    return Inputs(up(inputs.input), up(inputs.target), {k: up(v) for k, v in inputs.kwargs.items()})


def _compare_tensor(
    what: str, ours: Tensor, theirs: Tensor, truth: Tensor | None, tol: Tolerance
) -> str | None:
    """None when ours passes against torch (and the truth, in low precision), else why not."""
    if ours.shape != theirs.shape:
        return f"{what}: shape {tuple(ours.shape)} vs torch {tuple(theirs.shape)}"
    if ours.dtype != theirs.dtype:
        return f"{what}: dtype {ours.dtype} vs torch {theirs.dtype}"
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    nan_diff = a.isnan() != b.isnan()
    if nan_diff.any():
        idx = _index(nan_diff)
        return f"{what}: NaN where torch has none, or the reverse, at {idx}: {a[idx]!r} vs torch {b[idx]!r}"
    inf = b.isinf()
    if (a[inf] != b[inf]).any() or (a.isinf() & ~inf).any():
        idx = _index((a.isinf() | inf) & (a != b))
        return f"{what}: infinity mismatch at {idx}: {a[idx]!r} vs torch {b[idx]!r}"
    finite = b.isfinite()
    if not finite.any():
        return None
    if truth is None:
        excess = ((a - b).abs() - tol.atol - tol.rtol * b.abs()).where(finite, 0)
        if (excess > 0).any():
            idx = _index(excess == excess.max())
            return f"{what}: worst at {idx}: {a[idx].item()!r} vs torch {b[idx].item()!r}"
        return None
    t = truth.detach().cpu()
    err_ours = (a - t).abs().where(finite, 0)
    err_torch = (b - t).abs().where(finite, 0)
    bound = tol.factor * err_torch.max() + tol.atol + tol.rtol * t.abs().where(finite, 0).max()
    if err_ours.max() > bound:
        idx = _index(err_ours == err_ours.max())
        return (
            f"{what}: error {err_ours.max().item():.3g} > allowed {bound.item():.3g} (torch's own error "
            f"{err_torch.max().item():.3g}); worst at {idx}: ours {a[idx].item()!r}, "
            f"torch {b[idx].item()!r}, float64 truth {t[idx].item()!r}"
        )
    return None


def _index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0]) if mask.dim() else ()


def compare(case: Case, candidate: Callable[..., Any], reference: Callable[..., Any],
            device: str | torch.device = "cpu") -> list[str]:
    """Every way the candidate differs from torch on this case (empty when it passes)."""
    ours_inputs = build_inputs(case, device)
    ours = run(candidate, case, ours_inputs)
    theirs = run(reference, case, build_inputs(case, device))
    if theirs.backward_error in TORCH_LAYOUT_BUGS and ours.backward_error is None:
        # Where torch's backward refuses a layout it should accept, the contiguous input's
        # result is the one to match.
        theirs = run(reference, case, _contiguous(build_inputs(case, device)))
    problems: list[str] = []
    if ours.mutated:
        problems.append("mutated one of its inputs")
    if ours.error != theirs.error:
        problems.append(f"error: {ours.error or 'none raised'} vs torch {theirs.error or 'none raised'}")
    if ours.warnings != theirs.warnings:
        problems.append(f"warnings: {ours.warnings} vs torch {theirs.warnings}")
    if ours.backward_error != theirs.backward_error:
        problems.append(f"backward error: {ours.backward_error} vs torch {theirs.backward_error}")
    if problems or ours.error is not None:
        return problems
    if not isinstance(ours.value, Tensor) or not isinstance(theirs.value, Tensor):
        return [f"returned {type(ours.value).__name__} vs torch {type(theirs.value).__name__}"]

    # The input's dtype sets the precision of the computation, even when a float64 target or
    # weight promotes the result to float64.
    low_precision = case.dtype != torch.float64
    truth = run(reference, case, _as_float64(_contiguous(build_inputs(case, device)))) if low_precision else None
    tol = TOLERANCES.get(case.dtype, TOLERANCES[torch.float32])
    problem = _compare_tensor("value", ours.value, theirs.value, truth.value if truth else None, tol)
    if problem:
        problems.append(problem)
    if len(ours.grads) != len(theirs.grads):
        problems.append(f"{len(ours.grads)} gradients vs torch {len(theirs.grads)}")
        return problems
    for i, (g_ours, g_theirs) in enumerate(zip(ours.grads, theirs.grads, strict=False)):
        if (g_ours is None) != (g_theirs is None):
            problems.append(f"grad {i}: {'None' if g_ours is None else 'a tensor'} vs torch's")
            continue
        if g_ours is None or g_theirs is None:
            continue
        g_truth = truth.grads[i] if truth and truth.grads else None
        problem = _compare_tensor(f"grad {i}", g_ours, g_theirs, g_truth, tol)
        if problem:
            problems.append(problem)
    return problems
