"""The checker's own tests: plant a bug in torch's functions and watch the checker catch it.

Each mutant is torch's function with one planted bug. A mutant *visibly changes* a case when
running it and running torch on fresh copies of the case's inputs differ observably: another
exception (type or message), other warnings, an output or gradient of another dtype or shape,
an output or gradient that differs from torch's in at least one element (compared bit for bit,
NaN equal to NaN), or an input it modified. The checker must flag exactly the cases a mutant
visibly changes (100% of them, and none it leaves unchanged), and torch itself must pass every
case. The default run checks a deterministic sample of the grid; ``--full-grid`` all of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fusedce import testing
from fusedce.testing.compare import Outcome, run

HALF = (torch.float16, torch.bfloat16)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled on its way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _scaled_half_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def mutant(input: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(input, torch.Tensor) and input.dtype in HALF and input.requires_grad:
            input = _ScaleGrad.apply(input, 0.9)
        return fn(input, *args, **kwargs)

    return mutant


def _scaled_value(dtype: torch.dtype, factor: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def mutant(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            return out * factor if isinstance(out, torch.Tensor) and out.dtype == dtype else out

        return mutant

    return wrap


def _small_probabilities_zeroed(fn: Callable[..., Any]) -> Callable[..., Any]:
    def mutant(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return out.masked_fill(out.abs() < 1e-3, 0)

    return mutant


def _nan_inputs_overwritten(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Torch's result, after which the caller's NaN logits are zeroed in place: only the input
    check can see it."""

    def mutant(input: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(input, *args, **kwargs)
        if isinstance(input, torch.Tensor) and input.is_floating_point():
            with torch.no_grad():
                input.masked_fill_(input.isnan(), 0.0)
        return out

    return mutant


def _wrong_dtype(fn: Callable[..., Any]) -> Callable[..., Any]:
    def mutant(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return out.float() if out.dtype == torch.float64 else out.double()

    return mutant


def _warnings_dropped(fn: Callable[..., Any]) -> Callable[..., Any]:
    def mutant(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return mutant


def _smoothing_dropped(fn: Callable[..., Any]) -> Callable[..., Any]:
    def mutant(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("label_smoothing", None)
        return fn(*args, **kwargs)

    return mutant


def _may_warn(case: testing.Case) -> bool:
    implicit_dim = case.op in testing.grid.SOFTMAX_OPS and case.dim is None
    return implicit_dim or case.special in ("legacy_reduction", "scalar_input")


# name: (how to plant the bug in one of torch's functions, the ops it applies to, which cases
# of the grid it is tried on, 1 in N of them in the default run)
MUTANTS: dict[str, tuple[Callable[..., Any], tuple[str, ...], Callable[[testing.Case], bool], int]] = {
    "half_grad_x0.9": (_scaled_half_grad, testing.OPS, lambda c: c.dtype in HALF, 120),
    "bf16_value_x1.03": (_scaled_value(torch.bfloat16, 1.03), testing.OPS, lambda c: c.dtype == torch.bfloat16, 60),
    "f32_value_x(1+1e-5)": (_scaled_value(torch.float32, 1 + 1e-5), testing.OPS,
                            lambda c: c.dtype == torch.float32, 60),
    "small_probabilities_zeroed": (_small_probabilities_zeroed, ("softmax",), lambda c: True, 4),
    "nan_inputs_overwritten": (_nan_inputs_overwritten, testing.OPS, lambda c: c.special == "nan_logit", 2),
    "wrong_dtype": (_wrong_dtype, testing.OPS, lambda c: True, 120),
    # torch warns on the implicit softmax dim and the legacy arguments; the scalar softmax input
    # with an explicit dim shows that a mutant which changes nothing is not flagged.
    "warnings_dropped": (_warnings_dropped, testing.OPS, _may_warn, 3),
    "label_smoothing_dropped": (_smoothing_dropped, ("cross_entropy",), lambda c: bool(c.label_smoothing), 90),
}

GRID = testing.default_grid()
# Cases a review found the old rule let through; always in the sample.
ALWAYS = {"cross_entropy-123x7-bf16-class_last-index-ignore_index=1"}


def _cases(name: str, full: bool) -> list[testing.Case]:
    _, ops, applies, every = MUTANTS[name]
    chosen = [c for c in GRID if c.op in ops and applies(c)]
    if full:
        return chosen
    return [c for c in chosen if testing.grid.seed_of(c) % every == 0 or c.id in ALWAYS]


def _differs(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.dtype != y.dtype or x.shape != y.shape:
            return True
        return not torch.equal(x.isnan(), y.isnan()) or not torch.equal(x.nan_to_num(), y.nan_to_num())
    return (x is None) != (y is None) or type(x) is not type(y)


def _bits(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).tolist())


def visibly_changes(mutant: Callable[..., Any], case: testing.Case) -> bool:
    """Whether the mutant's observable behaviour on this case differs from torch's at all."""
    inputs = testing.build_inputs(case)
    before = [t.detach().clone() for t in inputs.tensors()]
    ours: Outcome = run(mutant, case, inputs)
    theirs: Outcome = run(testing.TORCH_FUNCTIONS[case.op], case, testing.build_inputs(case))
    # The checker's own input check is under test, so this one is separate: bit for bit.
    modified = any(_bits(b) != _bits(t.detach()) for b, t in zip(before, inputs.tensors(), strict=True))
    if modified or (ours.error, ours.backward_error, ours.warnings) != (
        theirs.error, theirs.backward_error, theirs.warnings
    ):
        return True
    if _differs(ours.value, theirs.value) or len(ours.grads) != len(theirs.grads):
        return True
    return any(_differs(a, b) for a, b in zip(ours.grads, theirs.grads, strict=True))


def _sweep(name: str, full: bool) -> None:
    plant, _, _, _ = MUTANTS[name]
    cases = _cases(name, full)
    visible = missed = wrongly_flagged = 0
    examples: list[str] = []
    for case in cases:
        mutant = plant(testing.TORCH_FUNCTIONS[case.op])
        changed = visibly_changes(mutant, case)
        flagged = bool(testing.check_case(mutant, case))
        visible += changed
        if changed != flagged:
            missed += changed
            wrongly_flagged += flagged
            if len(examples) < 5:
                examples.append(f"{'missed' if changed else 'flagged unchanged'}: {case.id}")
    assert visible > 0, f"{name}: no case of the {len(cases)} tried shows the bug; the sweep proves nothing"
    assert missed == 0 and wrongly_flagged == 0, (
        f"{name}: of {len(cases)} cases, {visible} visibly changed; {missed} of those passed the checker, "
        f"{wrongly_flagged} unchanged cases failed it:\n" + "\n".join(examples)
    )


@pytest.mark.parametrize("name", MUTANTS)
def test_each_planted_bug_is_caught_where_it_shows(name):
    _sweep(name, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", MUTANTS)
def test_each_planted_bug_is_caught_where_it_shows_full_grid(name):
    _sweep(name, full=True)


def _torch_cases(full: bool) -> list[testing.Case]:
    return GRID if full else testing.sample(GRID, 60) + [c for c in GRID if c.id in ALWAYS]


def test_torch_itself_passes():
    report = testing.check(testing.TORCH_FUNCTIONS, _torch_cases(full=False), label="torch")
    assert report.ok, f"{report.summary()}\n{report.details()}"


@pytest.mark.slow
def test_torch_itself_passes_full_grid():
    report = testing.check(testing.TORCH_FUNCTIONS, _torch_cases(full=True), label="torch")
    assert report.ok, f"{report.summary()}\n{report.details()}"


def _warning(message: str, category: type[Warning]) -> Callable[..., Any]:
    def candidate(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(message, category, stacklevel=2)
        return testing.TORCH_FUNCTIONS["softmax"](*args, **kwargs)

    return candidate


def test_only_the_backend_fallback_notice_is_ignored():
    case = testing.Case("softmax", (4, 6), torch.float32, dim=1)
    fallback = "fusedce: the cpu backend is unavailable (RuntimeError: no compiler); using the slower reference backend"
    assert testing.check_case(_warning(fallback, RuntimeWarning), case) == []
    assert testing.check_case(_warning("fusedce: something else", RuntimeWarning), case)
    assert testing.check_case(_warning(fallback, UserWarning), case)


def test_a_non_finite_truth_where_torch_is_finite_fails():
    from fusedce.testing.compare import _compare_tensor

    torch_value = torch.tensor([1.0, 2.0])
    problem = _compare_tensor("value", torch_value, torch_value, torch.tensor([1.0, float("nan")]), torch.float32)
    assert problem is not None and "cannot be judged" in problem
    problem = _compare_tensor("value", torch_value, torch_value, torch.tensor([float("inf"), 2.0]), torch.float32)
    assert problem is not None and "cannot be judged" in problem


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by 0.98 (a planted 2% error)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * 0.98


@pytest.mark.parametrize("which", ["input", "linear_weight"])
def test_linear_half_gradients_scaled_by_098_are_flagged(which):
    """linear_cross_entropy's half-precision gradients are re-judged through the dtype-rounded
    logits with a matmul margin (testing/linear_rule.py); the rule must stay sharp enough to
    flag a 2% error on every case with a nonzero gradient, while fusedce passes every case."""
    import fusedce

    cases = [c for c in testing.default_grid(ops=("linear_cross_entropy",))
             if c.dtype in (torch.bfloat16, torch.float16) and not c.special]
    cases = cases[:: max(1, len(cases) // 24)]

    def mutant(x, w, *args, **kwargs):
        if which == "input":
            x = _ScaleGrad.apply(x)
        else:
            w = _ScaleGrad.apply(w)
        return fusedce.linear_cross_entropy(x, w, *args, **kwargs)

    flagged = testing.check({"linear_cross_entropy": mutant}, cases, label="mutant")
    ours = testing.check({"linear_cross_entropy": fusedce.linear_cross_entropy}, cases, label="fusedce")
    assert not ours.failures, ours.details()
    assert len(flagged.failures) >= len(cases) - 1, f"{len(flagged.failures)} of {len(cases)} flagged"


def test_an_infinity_passes_only_where_the_truth_rounds_to_it():
    """Where torch is finite, ours may be inf only when the float64 truth is beyond the dtype's
    range (it rounds to inf); an inf where the truth is representable is a failure."""
    from fusedce.testing.compare import _compare_tensor

    torch_result = torch.tensor([65504.0, 1.0], dtype=torch.float16)
    ours = torch.tensor([float("inf"), 1.0], dtype=torch.float16)
    beyond = torch.tensor([65530.5, 1.0], dtype=torch.float64)
    within = torch.tensor([65500.0, 1.0], dtype=torch.float64)
    assert _compare_tensor("grad", ours, torch_result, beyond, torch.float16) is None
    assert "infinity" in (_compare_tensor("grad", ours, torch_result, within, torch.float16) or "")
