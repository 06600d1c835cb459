"""Run one case through a candidate and through torch, and say how they differ.

The rule, element by element (``TOLERANCES`` holds every number):

* **float64** (the computation's precision is float64): torch is the answer. Each element must
  satisfy ``|ours - torch| <= k * ulp64(torch) + c * eps64 * S``.
* **float32, bfloat16, float16**: the answer is torch's function run in float64 on the same
  (already rounded) inputs, the *truth*. Each element must satisfy

      |ours - truth| <= |torch - truth| + k * ulp_dtype(truth) + c * eps_compute * S

  where ``ulp_dtype(v)`` is the spacing of the dtype's representable numbers at ``|v|`` (the
  subnormal spacing below the smallest normal), ``eps_compute`` is the machine epsilon of the
  precision a fused kernel computes in (float32 for the half types), and ``S`` is the largest
  finite ``|truth|`` in the tensor.

Why these margins. An implementation that computes exactly and rounds once to the dtype is off by
at most 0.5 ulp; one that computes in a wider precision and then rounds can land on the other
neighbour of the truth, 1 ulp away, where torch happened to be exact (``k = 1`` for the half types,
whose results are computed in float32 and rounded once). In float32 and float64 the result is
computed in the output's own precision, so the few roundings of a log-sum-exp (the max, the sum of
exponentials, the log, the subtraction) can each cost an ulp of the result: ``k = 4``. The
``c * eps_compute * S`` floor is the absolute error of that arithmetic at the tensor's own scale:
an element far smaller than the tensor's largest (the target class's ``p - 1`` when ``p`` is
close to 1, a log-probability close to 0 next to a large log-sum-exp) is the difference of numbers
of size ``S``, and every probability is ``exp(x - lse)``, whose argument carries an absolute
error of ``eps * |lse|``; the grid's log-sum-exps reach about 16, so ``c = 16``. In float64 the
candidate is compared with torch, so both sides' errors count, and a float64 sum over 2500
classes taken in another order than torch's differs by about ``sqrt(2500) * eps = 50 eps`` of its
terms: ``c = 64``. For the half types the floor is 512 (float16) and 4096 (bfloat16) times finer
than their own ulp at ``S``, so it does not hide a lost term: a bfloat16 probability of 1e-3 set
to zero fails. The only absolute allowance is the dtype's subnormal spacing, the ulp at zero.
For a loss reduced to a scalar, ``S`` is the value times ``sum |l_i| / |sum l_i|`` over the
unreduced losses: a sum is only as exact as its terms are large (``_sum_condition``).

cross_entropy's results are sums and differences of terms that can be far larger than ``S``: its
gradient with respect to the logits is ``u - p·Σu`` (``u = ∂loss/∂log p``), which a confident row
with a near-one-hot target cancels to almost nothing. That gradient is allowed ``c * eps_compute *
T`` more per element, ``T`` the size of its two terms; and a float64 value, judged against torch,
whose log-sum is rounded at the ulp of 1, ``c * eps64`` of the loss's terms. ``testing.cancellation``
derives both.

The gradient of softmax and log_softmax is, in torch as here, a function of the saved output, and
magnifies that output's rounding: where it fails against the truth it is judged again against
torch's float64 backward of the candidate's own output (see ``_backward_of_own_output``).
linear_cross_entropy's gradients go through two matmuls of rounded operands (the logits, and
their gradient): where one fails against the truth it is judged again as ``linear_rule`` derives.

Non-finite values: NaN must appear exactly where torch has NaN, and an infinity exactly where
torch has the same infinity, with one documented exception (README, "Where fusedce knowingly
differs"): where torch's float16 sums, accumulated in float16, overflow to +-inf (or to NaN, as
inf - inf) but the truth is finite, a result within the margin of the truth (with no allowance
for torch's error) is accepted, and so is an infinity where the truth is, or rounds to, that
infinity in the dtype. A NaN or infinite truth where torch is finite is a failure: nothing can be
judged against it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cancellation import float64_summation_factor, gradient_terms, log_prob_upstream, value_terms
from .grid import Case, Inputs, build_inputs, seed_of
from .linear_rule import rounded_logits_truth


@dataclass(frozen=True)
class Tolerance:
    """The margins of the rule in this module's docstring, for one dtype.

    ``ulps`` is k, in units of the dtype's last place at the element's true magnitude;
    ``scale_ulps`` is c, in machine epsilons of ``compute`` at the tensor's largest magnitude.
    """

    ulps: float
    scale_ulps: float
    compute: torch.dtype


TOLERANCES = {
    torch.float64: Tolerance(ulps=4, scale_ulps=64, compute=torch.float64),
    torch.float32: Tolerance(ulps=4, scale_ulps=16, compute=torch.float32),
    torch.bfloat16: Tolerance(ulps=1, scale_ulps=16, compute=torch.float32),
    torch.float16: Tolerance(ulps=1, scale_ulps=16, compute=torch.float32),
}

# The one notice of fusedce's own that is not part of torch's behaviour: the automatic backend
# fell back to the reference. Every other warning, fusedce's or not, is compared with torch's.
_FALLBACK_WARNING = re.compile(r"^fusedce: the \w+ backend is unavailable \(")


def ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype``'s numbers at each ``|value|`` (as float64): ``2**e * eps`` for
    ``2**e <= |v| < 2**(e+1)``, and the subnormal spacing ``tiny * eps`` below ``tiny``."""
    info = torch.finfo(dtype)
    magnitude = values.double().abs().clamp(min=info.tiny).nan_to_num(posinf=info.max)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    return torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)


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


def _unchanged(before: Tensor, after: Tensor) -> bool:
    """Bit for bit, so NaN stays NaN (with its payload) and -0.0 stays -0.0."""
    after = after.detach()
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    return torch.equal(_bits(before), _bits(after))


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


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
    outcome.warnings = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not (issubclass(w.category, RuntimeWarning) and _FALLBACK_WARNING.match(str(w.message)))
    ]
    outcome.value = out.detach() if isinstance(out, Tensor) else out
    outcome.mutated = not all(_unchanged(b, t) for b, t in zip(before, inputs.tensors(), strict=True))
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
    """The same values with every floating tensor in float64 (the ground truth's inputs), and a
    floating ``dtype=`` argument raised to float64 too."""

    def up(t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.detach().double().requires_grad_(t.requires_grad)
        return t

    kwargs = {k: up(v) for k, v in inputs.kwargs.items()}
    if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"].is_floating_point:
        kwargs["dtype"] = torch.float64
    return Inputs(up(inputs.input), up(inputs.target), kwargs)


def precision(case: Case, inputs: Inputs) -> torch.dtype:
    """The precision the op computes in: the input's dtype, or a floating ``dtype=`` argument
    (which converts the input first). A float64 target or weight only promotes the result."""
    dtype = inputs.kwargs.get("dtype")
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return case.dtype


def _at(t: Tensor, idx: tuple[int, ...]) -> float:
    return float(t[idx].item())


def _index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0]) if mask.dim() else ()


def _non_finite_problem(what: str, a: Tensor, b: Tensor, t: Tensor | None, dtype: torch.dtype) -> str | None:
    """Where torch is NaN or infinite, ours must be the same (but see the overflow exception in
    the module docstring, whose finite elements ``_compare_tensor`` then judges against the truth)."""
    if t is not None:
        excused = _torch_overflowed(a, b, t, dtype) | _ours_rounds_to_infinity(a, b, t, dtype)
    else:
        excused = torch.zeros_like(a, dtype=torch.bool)
    nan_diff = (a.isnan() != b.isnan()) & ~excused
    if nan_diff.any():
        idx = _index(nan_diff)
        return f"{what}: NaN where torch has none, or the reverse, at {idx}: {_at(a, idx)!r} vs torch {_at(b, idx)!r}"
    inf_diff = (a.isinf() | b.isinf()) & (a != b) & ~excused
    if inf_diff.any():
        idx = _index(inf_diff)
        return f"{what}: infinity mismatch at {idx}: {_at(a, idx)!r} vs torch {_at(b, idx)!r}"
    return None


def _torch_overflowed(a: Tensor, b: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Elements where torch is infinite or NaN but ours is the truth rounded to ``dtype`` (an
    infinity the truth has, or rounds to beyond the dtype's range), or ours and the truth are
    finite: torch's half-precision accumulator overflowed, and inf - inf gave NaN."""
    rounded = t.to(dtype).double()
    return ~b.isfinite() & ((t.isfinite() & a.isfinite()) | (a == rounded))


def _ours_rounds_to_infinity(a: Tensor, b: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Elements where ours is infinite and torch finite because the truth is beyond the dtype's
    range (it rounds to ours): torch's half-precision intermediate rounded below the overflow
    threshold, as a float16 log-probability times an upstream (torch 65504, truth 65530.5)."""
    return a.isinf() & b.isfinite() & (a == t.to(dtype).double())


def _compare_tensor(
    what: str, ours: Tensor, theirs: Tensor, truth: Tensor | None, dtype: torch.dtype, credit_torch: bool = True,
    condition: float = 1.0, extra_margin: Tensor | None = None,
) -> str | None:
    """None when ours passes the rule of this module's docstring, else why not.

    ``dtype`` is the precision the op computes in; ``truth`` is None when that is float64.
    Without ``credit_torch``, torch's own error earns ours no allowance. ``condition`` scales
    ``S`` (see ``_sum_condition``). ``extra_margin``, per element, is added to the margin
    (``linear_rule``'s bound on a rounded gradient's matmul).
    """
    if ours.shape != theirs.shape:
        return f"{what}: shape {tuple(ours.shape)} vs torch {tuple(theirs.shape)}"
    if ours.dtype != theirs.dtype:
        return f"{what}: dtype {ours.dtype} vs torch {theirs.dtype}"
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    t = truth.detach().double().cpu() if truth is not None else None
    problem = _non_finite_problem(what, a, b, t, dtype)
    if problem:
        return problem
    if t is None:
        judged = b.isfinite()
        reference, err_torch = b, torch.zeros_like(b)
    else:
        overflowed = _torch_overflowed(a, b, t, dtype) & a.isfinite()
        judged = (b.isfinite() & ~_ours_rounds_to_infinity(a, b, t, dtype)) | overflowed
        unjudgeable = judged & ~t.isfinite()
        if unjudgeable.any():
            idx = _index(unjudgeable)
            return (f"{what}: the float64 truth is {_at(t, idx)!r} at {idx} where torch is finite "
                    f"({_at(b, idx)!r}): the case cannot be judged")
        reference = t
        # Where torch overflowed it earns no allowance: ours must be close to the truth itself.
        err_torch = (b - t).abs().where(b.isfinite() & credit_torch, 0)
    if not judged.any():
        return None
    scale = reference.abs().where(judged, 0).max() * condition
    margin = tol.ulps * ulp(reference, dtype) + tol.scale_ulps * torch.finfo(tol.compute).eps * scale
    if extra_margin is not None:
        margin = margin + extra_margin.detach().double().cpu()
    err_ours = (a - reference).abs()
    excess = (err_ours - err_torch - margin).where(judged, -1)
    if (excess > 0).any():
        idx = _index(excess == excess.max())
        n_bad = int((excess > 0).sum())
        where = f"{n_bad} of {a.numel()} elements; worst at {idx}: ours {_at(a, idx)!r}, torch {_at(b, idx)!r}"
        if t is None:
            return f"{what}: {where} (allowed |ours - torch| <= {_at(margin, idx):.3g})"
        return (f"{what}: {where}, float64 truth {_at(t, idx)!r}; error {_at(err_ours, idx):.3g} > torch's "
                f"{_at(err_torch, idx):.3g} + margin {_at(margin, idx):.3g}")
    return None


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

    # The precision of the computation decides the rule, even when a float64 target or weight
    # promotes the result to float64.
    dtype = precision(case, ours_inputs)
    truth = None
    if dtype != torch.float64:
        truth = run(reference, case, _as_float64(_contiguous(build_inputs(case, device))))
    condition = _sum_condition(case, reference, device, truth is not None) if theirs.value.dim() == 0 else 1.0
    value_margin, logits_grad_margin = (None, None)
    if case.op == "cross_entropy":
        value_margin, logits_grad_margin = _cross_entropy_margins(case, reference, device, dtype, theirs.value)
    problem = _compare_tensor("value", ours.value, theirs.value, truth.value if truth else None, dtype,
                              condition=condition, extra_margin=value_margin)
    if problem:
        problems.append(problem)
    if len(ours.grads) != len(theirs.grads):
        problems.append(f"{len(ours.grads)} gradients vs torch {len(theirs.grads)}")
        return problems
    through_rounded: tuple[list[Tensor | None], list[Tensor | None]] | None = None  # linear_rule, when needed
    for i, (g_ours, g_theirs) in enumerate(zip(ours.grads, theirs.grads, strict=True)):
        if (g_ours is None) != (g_theirs is None):
            problems.append(f"grad {i}: {'None' if g_ours is None else 'a tensor'} vs torch's")
            continue
        if g_ours is None or g_theirs is None:
            continue
        g_truth = truth.grads[i] if truth and truth.grads else None
        if truth is not None and g_truth is None:
            problems.append(f"grad {i}: the float64 truth has no gradient here: the case cannot be judged")
            continue
        problem = _compare_tensor(f"grad {i}", g_ours, g_theirs, g_truth, dtype,
                                  extra_margin=logits_grad_margin if i == 0 else None)
        if problem and truth is not None:
            own = _backward_of_own_output(case, ours_inputs, ours.value)
            if own is not None and not _compare_tensor(f"grad {i}", g_ours, g_theirs, own, dtype, credit_torch=False):
                problem = None
        if problem and truth is not None and case.op == "linear_cross_entropy":
            if through_rounded is None:
                inputs64 = _as_float64(_contiguous(build_inputs(case, device)))
                through_rounded = rounded_logits_truth(inputs64, dtype, lambda out: _upstream(case, out)) or ([], [])
            truths, margins = through_rounded
            if i < len(truths) and truths[i] is not None and not _compare_tensor(
                f"grad {i}", g_ours, g_theirs, truths[i], dtype, extra_margin=margins[i]
            ):
                problem = None
        if problem:
            problems.append(problem)
    return problems


def _cross_entropy_margins(case: Case, reference: Callable[..., Any], device: str | torch.device,
                           dtype: torch.dtype, value: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """cross_entropy's allowances for cancelling terms (``testing.cancellation``): for the value
    (float64 epsilons of the loss's terms), and for the gradient with respect to the logits
    (grad 0, when the logits require grad: ``c·eps`` of the compute precision times its terms)."""
    inputs = _as_float64(_contiguous(build_inputs(case, device)))
    logits = inputs.input
    if not isinstance(logits, Tensor) or not logits.requires_grad or logits.dim() == 0:
        return None, None
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    eps = torch.finfo(tol.compute).eps
    dim = case.class_dim
    # In float64 both sides' sums count, and they grow with the classes summed.
    factor = float64_summation_factor(logits.shape[dim]) if dtype == torch.float64 else 1.0

    def call() -> Tensor:
        return inputs.call(reference)

    # The value's allowance is in float64 epsilons whatever the dtype: it is the float64 answer's
    # (torch's, or the truth's) own rounding of log Σ, far below a float32 loss's ulp unless the
    # loss is about that small (logits 40 apart: 4e-18, which float64 torch rounds to 0).
    value_margin = None
    u = log_prob_upstream(call, logits, None)
    if u is not None:
        per_row = value_terms(u, logits, dim, reduced=False)
        terms = per_row if per_row.shape == value.shape else per_row.sum()
        c64 = TOLERANCES[torch.float64].scale_ulps * float64_summation_factor(logits.shape[dim])
        value_margin = c64 * torch.finfo(torch.float64).eps * terms
    u = log_prob_upstream(call, logits, _upstream(case, value).double())
    grad_margin = None if u is None else tol.scale_ulps * factor * eps * gradient_terms(u, logits, dim)
    return value_margin, grad_margin


def _sum_condition(case: Case, reference: Callable[..., Any], device: str | torch.device, in_float64: bool) -> float:
    """For a loss reduced to a scalar: ``sum |l_i| / |sum l_i|`` over the unreduced losses.

    A sum's rounding error is a few eps of the sum of its terms' magnitudes, not of the sum: where
    the terms cancel (negative logits under a weight, a log-probability target) a candidate that
    adds them in another order than torch's differs by that much. 1 for everything else.
    """
    if case.op not in ("cross_entropy", "nll_loss"):
        return 1.0
    inputs = build_inputs(case, device)
    if in_float64:
        inputs = _as_float64(inputs)
    for legacy in ("size_average", "reduce"):
        inputs.kwargs.pop(legacy, None)
    inputs.kwargs["reduction"] = "none"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            terms = inputs.call(reference).double()
    except Exception:
        return 1.0
    terms = terms[terms.isfinite()]
    total = terms.sum().abs()
    if terms.numel() == 0 or total == 0:
        return 1.0
    return max(1.0, float(terms.abs().sum() / total))


_OUTPUT_BACKWARDS: dict[str, Callable[[Tensor, Tensor, int, torch.dtype], Tensor]] = {
    "softmax": torch._softmax_backward_data,
    "log_softmax": torch._log_softmax_backward_data,
}


def _backward_of_own_output(case: Case, inputs: Inputs, value: Tensor) -> Tensor | None:
    """torch's float64 backward of softmax or log_softmax applied to the candidate's own output.

    These backwards are functions of the saved output alone (in torch too), and the cancellation
    in ``g - sum(g * y)`` magnifies the output's rounding to the dtype: a correctly rounded output
    one ulp away from torch's can move a gradient element by several percent of itself. So a
    gradient that fails against the truth is judged again, with no allowance for torch's error,
    against this formula on the output the candidate returned (which has passed the value check).
    None where the formula does not apply (other ops, a ``dtype=`` argument, a scalar input).
    """
    backward = _OUTPUT_BACKWARDS.get(case.op)
    if backward is None or "dtype" in inputs.kwargs or value.dim() == 0 or value.dtype != case.dtype:
        return None
    upstream = _upstream(case, value).double().cpu()
    return backward(upstream, value.double().cpu(), case.class_dim, torch.float64)
