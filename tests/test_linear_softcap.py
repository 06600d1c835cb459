"""``linear_cross_entropy(..., logit_softcap=cap)``: the loss of the soft-capped logits
``cap * tanh(linear(x, W, b) / cap)``, as Gemma 2's ``final_logit_softcapping`` defines them,
still a block of rows at a time.

The reference formula is that definition through torch: ``cross_entropy`` of the capped
``linear``. Parity runs on blocks of two rows on every CPU backend; gradcheck and
gradgradcheck in float64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fusedce
from fusedce import use_backend
from fusedce.kernels import available_backends

Options = torch.nn.LinearCrossEntropyOptions


def reference(x, w, target, *, linear_bias=None, logit_softcap, **kwargs):
    """cross_entropy(cap * tanh(linear(x, W, b) / cap)), K-dim weights as torch's
    linear_cross_entropy reshapes them."""
    logits = F.linear(x, w.flatten(0, -2), None if linear_bias is None else linear_bias.flatten())
    capped = torch.tanh(logits / logit_softcap) * logit_softcap
    capped = capped.reshape(*x.shape[:-1], *w.shape[:-1])
    return F.cross_entropy(capped, target, **kwargs)


def _inputs(dtype=torch.float32, rows=7, classes=5, hidden=4, out=(), prob=False, bias=True, scale=3.0):
    """Inputs whose logits reach a few times the cap (scale), so tanh bends them."""
    torch.manual_seed(0)
    x = (torch.randn(rows, hidden, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(classes, *out, hidden, dtype=dtype).requires_grad_()
    b = torch.randn(classes, *out, dtype=dtype).requires_grad_() if bias else None
    if prob:
        target = torch.randn(rows, classes, *out, dtype=dtype).softmax(1)
    else:
        target = torch.randint(0, classes, (rows, *out))
        target[0] = -100
    return x, w, b, target


CASES: list[dict[str, Any]] = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2, "weight": "w"},
    {"prob": True},
    {"prob": True, "label_smoothing": 0.1, "reduction": "sum"},
    {"out": (3,)},
    {"bias": False, "ignore_index": 2},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_matches_the_reference_formula(backend, case):
    case = dict(case)
    prob, out, bias = case.pop("prob", False), case.pop("out", ()), case.pop("bias", True)
    x, w, b, target = _inputs(out=out, prob=prob, bias=bias)
    if "ignore_index" in case:
        target[0] = case["ignore_index"]
    if case.get("weight") == "w":
        case["weight"] = torch.rand(5) + 0.5
    cap = 1.5
    expected = reference(x, w, target, linear_bias=b, logit_softcap=cap, **case)
    with use_backend(backend):
        actual = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, logit_softcap=cap,
                                              options=Options(batch_chunk_size=2), **case)
    torch.testing.assert_close(actual, expected)
    params = [t for t in (x, w, b) if t is not None]
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, params, upstream),
                               torch.autograd.grad(expected, params, upstream))
    # The cap changes the answer (the test could not pass by ignoring it).
    assert not torch.allclose(actual, F.linear_cross_entropy(x, w, target, linear_bias=b, **case))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_and_gradgradcheck_in_float64(reduction):
    x, w, b, target = _inputs(torch.float64, rows=5, classes=4, hidden=3)

    def f(x, w, b):
        return fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, logit_softcap=2.0,
                                            options=Options(batch_chunk_size=2))

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_double_backward_matches_the_reference():
    """The gradients with create_graph=True (the differentiable backward) and a second order
    product, against the reference formula's (gradgradcheck alone checks only that backward
    against itself)."""
    x, w, b, target = _inputs(torch.float64)
    results = []
    for fn in (fusedce.linear_cross_entropy, reference):
        loss = fn(x, w, target, linear_bias=b, logit_softcap=1.5)
        grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), (x, w, b))
        results.append((*grads, *second))
    torch.testing.assert_close(results[0], results[1])


def test_forward_ad_matches_the_reference():
    x, w, b, target = _inputs(torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))

    def ours(x, w, b):
        return fusedce.linear_cross_entropy(x, w, target, linear_bias=b, logit_softcap=1.5)

    def theirs(x, w, b):
        return reference(x, w, target, linear_bias=b, logit_softcap=1.5)

    _, actual = torch.func.jvp(ours, (x, w, b), tangents)
    _, expected = torch.func.jvp(theirs, (x, w, b), tangents)
    torch.testing.assert_close(actual, expected)


def test_bfloat16_rounds_as_the_reference():
    """The cap runs op by op in the logits' dtype, as the reference formula does."""
    x, w, b, target = _inputs(torch.bfloat16, rows=16, classes=64, hidden=16, scale=1.0)
    expected = reference(x, w, target, linear_bias=b, logit_softcap=2.0)
    actual = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, logit_softcap=2.0)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(torch.autograd.grad(actual, (x, w)), torch.autograd.grad(expected, (x, w)),
                               atol=2e-2, rtol=1.6e-2)


def test_compiles_without_a_graph_break():
    x, w, b, target = _inputs()

    def f(x, w, b):
        return fusedce.linear_cross_entropy(x, w, target, linear_bias=b, logit_softcap=1.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    torch.testing.assert_close(torch.autograd.grad(compiled(x, w, b), (x, w)), torch.autograd.grad(f(x, w, b), (x, w)))


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan"), True, "2"])
def test_a_bad_cap_raises(cap):
    x, w, _, target = _inputs()
    with pytest.raises(ValueError, match="logit_softcap must be None or a finite number > 0"):
        fusedce.linear_cross_entropy(x, w, target, logit_softcap=cap)


def test_no_cap_is_the_plain_path():
    x, w, b, target = _inputs()
    plain = fusedce.linear_cross_entropy(x, w, target, linear_bias=b)
    assert torch.equal(fusedce.linear_cross_entropy(x, w, target, linear_bias=b, logit_softcap=None), plain)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upcast_keeps_the_accumulation_dtype(reduction):
    """upcast_linear_cross_entropy on bfloat16: cross_entropy(logits.float()), as transformers'
    loss computes it, in float32; its gradients are linear_cross_entropy's."""
    from fusedce.linear.functional import upcast_linear_cross_entropy

    x, w, b, target = _inputs(torch.bfloat16, rows=16, classes=64, hidden=16, scale=1.0)
    actual = upcast_linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, logit_softcap=2.0)
    expected = F.cross_entropy(torch.tanh(F.linear(x, w, b) / 2.0).mul(2.0).float(), target, reduction=reduction)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    plain = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, logit_softcap=2.0)
    assert plain.dtype == torch.bfloat16
    upstream = torch.randn_like(actual).bfloat16().float()  # the same upstream gradient in either dtype
    torch.testing.assert_close(torch.autograd.grad(actual, (x, w, b), upstream),
                               torch.autograd.grad(plain, (x, w, b), upstream.bfloat16()))
