"""A hypothesis property test: random shapes and arguments, parity with torch on every backend."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedce import functional, testing, use_backend
from fusedce.kernels import available_backends

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # the interpreter is too slow here


@st.composite
def cases(draw) -> testing.Case:
    op = draw(st.sampled_from(testing.OPS))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    class_dim = 0 if ndim == 1 else 1
    shape = (*shape[:class_dim], draw(st.integers(1, 40)), *shape[class_dim + 1:])
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = draw(st.sampled_from(["contiguous", "class_last", "strided"])) if ndim >= 2 else "contiguous"
    if op == "linear_cross_entropy":
        # Its shape is (H, *logits_shape) and its layouts are its own (testing.linear_grid).
        shape = (draw(st.integers(1, 8)), *shape[:3])
        layout = draw(st.sampled_from(["contiguous", "tied", "strided"])) + draw(st.sampled_from(["", "+bias"]))
    if op in ("log_softmax", "softmax"):
        return testing.Case(op, shape, dtype, layout, dim=draw(st.integers(-ndim, ndim - 1)))
    smoothed = op in ("cross_entropy", "linear_cross_entropy")
    target = draw(st.sampled_from(["index", "prob"])) if smoothed else "index"
    smoothing = draw(st.sampled_from([None, 0.0, 0.05, 0.5, 1.0])) if smoothed else None
    return testing.Case(
        op, shape, dtype, layout, target,
        weight=draw(st.sampled_from(["none", "positive", "some_zero"])),
        ignore_index=draw(st.sampled_from([None, -1, 0, 2])) if target == "index" else None,
        reduction=draw(st.sampled_from([None, "none", "sum", "mean"])),
        label_smoothing=smoothing,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), backend=st.sampled_from(BACKENDS))
def test_random_calls_match_torch(case, backend):
    with use_backend(backend):
        problems = testing.check_case(getattr(functional, case.op), case)
    assert not problems, f"{case.id}: {problems}"
