"""``fusedce.patch()``: every spelling of torch's cross-entropy family goes to fusedce inside the
block, with torch's semantics; everything else, and everything after the block, is torch's."""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.functional import cross_entropy, log_softmax, nll_loss, softmax  # bound before any block
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import fusedce
from fusedce import _autograd, testing
from fusedce.patch import _ROUTES


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach fusedce's autograd entry points, by op, and notes whether a
    torch function mode was active while fusedce ran (it must not be: no recursion)."""
    calls: Counter[str] = Counter()
    mode_seen: list[bool] = []
    threads: list[int] = []
    for name in ("cross_entropy", "cross_entropy_prob", "cross_entropy_reduced", "nll_loss", "log_softmax", "softmax"):
        original = getattr(_autograd, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name.removesuffix("_prob").removesuffix("_reduced")] += 1
            mode_seen.append(torch._C._is_torch_function_mode_enabled())
            threads.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(_autograd, name, spy)
    calls.mode_seen = mode_seen  # type: ignore[attr-defined]
    calls.threads = threads  # type: ignore[attr-defined]
    return calls


def _logits(dtype=torch.float32):
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=dtype).requires_grad_()


TARGET = torch.tensor([0, 4, 2, 1, 3, 4])
PROBABILITIES = torch.rand(6, 5, generator=torch.Generator().manual_seed(1))
WEIGHT = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
# Modules built before any block: their forward calls F.*, which the mode sees.
CE_MODULE = nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.1)
NLL_MODULE = nn.NLLLoss(reduction="sum")
LOG_SOFTMAX_MODULE = nn.LogSoftmax(dim=1)
SOFTMAX_MODULE = nn.Softmax(dim=0)

SPELLINGS = {
    "F.cross_entropy": ("cross_entropy",
                        lambda x: F.cross_entropy(x, TARGET, weight=WEIGHT.to(x.dtype), label_smoothing=0.2)),
    "imported cross_entropy": ("cross_entropy", lambda x: cross_entropy(x, TARGET, reduction="none")),
    "probability target": ("cross_entropy", lambda x: F.cross_entropy(x, PROBABILITIES.to(x.dtype))),
    "nn.CrossEntropyLoss": ("cross_entropy", lambda x: CE_MODULE(x, TARGET)),
    "F.nll_loss": ("nll_loss", lambda x: F.nll_loss(x, TARGET, ignore_index=2)),
    "imported nll_loss": ("nll_loss", lambda x: nll_loss(x, TARGET)),
    "nn.NLLLoss": ("nll_loss", lambda x: NLL_MODULE(x, TARGET)),
    "F.log_softmax": ("log_softmax", lambda x: F.log_softmax(x, 1)),
    "imported log_softmax": ("log_softmax", lambda x: log_softmax(x, dim=0, dtype=torch.float64)),
    "torch.log_softmax": ("log_softmax", lambda x: torch.log_softmax(x, 1)),
    "torch.log_softmax dtype": ("log_softmax", lambda x: torch.log_softmax(x, -1, torch.float64)),
    "torch.special.log_softmax": ("log_softmax", lambda x: torch.special.log_softmax(x, 0)),
    "Tensor.log_softmax": ("log_softmax", lambda x: x.log_softmax(dim=1)),
    "nn.LogSoftmax": ("log_softmax", lambda x: LOG_SOFTMAX_MODULE(x)),
    "F.softmax": ("softmax", lambda x: F.softmax(x, dim=1)),
    "imported softmax": ("softmax", lambda x: softmax(x, 0)),
    "torch.softmax": ("softmax", lambda x: torch.softmax(input=x, dim=1)),
    "torch.special.softmax": ("softmax", lambda x: torch.special.softmax(x, 1, dtype=torch.float64)),
    "Tensor.softmax": ("softmax", lambda x: x.softmax(1, torch.float64)),
    "Tensor.softmax unbound": ("softmax", lambda x: torch.Tensor.softmax(x, -2)),
    "nn.Softmax": ("softmax", lambda x: SOFTMAX_MODULE(x)),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_every_spelling_goes_to_fusedce_once_with_torchs_result(spelling, dtype, fused_calls):
    op, call = SPELLINGS[spelling]
    x_torch, x_ours = _logits(dtype), _logits(dtype)
    expected = call(x_torch)
    expected.backward(torch.ones_like(expected))
    assert not fused_calls

    with fusedce.patch():
        actual = call(x_ours)
    assert fused_calls == {op: 1}, "routed to fusedce exactly once, with no recursion into the mode"
    assert fused_calls.mode_seen == [False], "the mode is off while fusedce runs"

    actual.backward(torch.ones_like(actual))
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(actual, expected, **tol)
    torch.testing.assert_close(x_ours.grad, x_torch.grad, **tol)


def test_the_table_names_every_spelling():
    """torch.special.softmax and torch.softmax are distinct objects, as are the Tensor methods."""
    expected = {F.cross_entropy, F.nll_loss, F.log_softmax, F.softmax, torch.log_softmax, torch.softmax,
                torch.special.log_softmax, torch.special.softmax, torch.Tensor.log_softmax, torch.Tensor.softmax,
                F.linear_cross_entropy}
    assert set(_ROUTES) == expected


@pytest.mark.parametrize("spelling", ["F.linear_cross_entropy", "nn.LinearCrossEntropyLoss"])
def test_linear_cross_entropy_goes_to_fusedce(spelling):
    """torch's own path ends in NllLossBackward0 (it materialises the logits); fusedce's in its
    fused Function. Values and gradients are torch's."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 8, dtype=torch.float64, generator=gen)
    module = nn.LinearCrossEntropyLoss(8, 5, bias=True, label_smoothing=0.1, dtype=torch.float64)
    target = TARGET.clone()
    target[1] = -100

    def call():
        if spelling == "nn.LinearCrossEntropyLoss":
            return module(hidden, target)
        return F.linear_cross_entropy(hidden, module.linear.weight, target, linear_bias=module.linear.bias)

    expected = call()
    grads_expected = torch.autograd.grad(expected, list(module.parameters()))
    with fusedce.patch():
        actual = call()
    assert "NllLoss" not in type(actual.grad_fn).__name__ and "LinearCrossEntropy" in type(actual.grad_fn).__name__
    grads_actual = torch.autograd.grad(actual, list(module.parameters()))
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    for ours, theirs in zip(grads_actual, grads_expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def _implicit_dim_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()  # the line every warning below must name, inside the block or not
    return [(str(w.message), w.category, w.filename, w.lineno) for w in caught]


@pytest.mark.parametrize("call", [
    lambda: F.softmax(torch.randn(2, 3)),
    lambda: F.log_softmax(torch.randn(2, 3), None, 3, torch.float64),
    lambda: nn.Softmax()(torch.randn(2, 3)),
    lambda: F.softmax(torch.ones(2, 3, dtype=torch.int64)),  # torch's path: warns, then raises
], ids=["F.softmax", "F.log_softmax", "nn.Softmax", "int input"])
def test_the_implicit_dim_warning_names_the_same_line(call):
    def run():
        try:
            return _implicit_dim_warnings(call)
        except NotImplementedError:
            return "raised"

    expected = run()
    with fusedce.patch():
        actual = run()
    assert actual == expected and expected


def _outcome(call):
    try:
        value = call()
    except Exception as exc:
        return type(exc), str(exc)
    return value


@pytest.mark.parametrize("call", [
    lambda: torch.softmax(torch.arange(6).view(2, 3), 1),  # integer input
    lambda: torch.log_softmax(torch.ones(2, 3, dtype=torch.complex64), 1),
    lambda: F.cross_entropy(torch.ones(2, 3, dtype=torch.int32), torch.tensor([0, 1])),
    lambda: F.softmax(torch.ones(2, 3, dtype=torch.float16), 1, dtype=torch.int64),
], ids=["int softmax", "complex log_softmax", "int cross_entropy", "int dtype="])
def test_dtypes_fusedce_does_not_cover_go_to_torch(call, fused_calls):
    expected = _outcome(call)
    with fusedce.patch():
        actual = _outcome(call)
    assert not fused_calls
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected)
    else:
        assert actual == expected


def test_out_goes_to_torch(fused_calls):
    x = torch.randn(3, 4)
    out = torch.empty(3, 4)
    with fusedce.patch():
        result = torch.log_softmax(x, 1, out=out)
        torch.softmax(x, 0, out=out)
    assert not fused_calls
    assert result is out
    torch.testing.assert_close(out, torch.softmax(x, 0))


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_and_sparse_go_to_torch(fused_calls):
    x = torch.randn(3, 4).as_subclass(_Subclass)
    sparse_target = torch.rand(3, 4).to_sparse()
    with fusedce.patch():
        result = F.cross_entropy(x, torch.tensor([0, 3, 1]))
        sparse_loss = F.cross_entropy(torch.randn(3, 4), sparse_target)
    assert not fused_calls
    assert type(result) is _Subclass  # torch's path keeps the subclass
    assert sparse_loss.layout == torch.strided


def test_errors_are_torchs(fused_calls):
    x = torch.randn(3, 4)
    for call in (lambda: torch.softmax(x, 2), lambda: x.log_softmax(-3),
                 lambda: F.cross_entropy(x, torch.tensor([0, 4, 1]))):
        expected = _outcome(call)
        with fusedce.patch():
            assert _outcome(call) == expected
    assert fused_calls  # these were fusedce's errors, matching torch's


def test_the_parity_grid_passes_through_the_patched_spellings():
    """The checker's rules (values, gradients, dtypes, warnings, errors) on a sample of the grid,
    for torch's own functions called inside the block."""

    def patched(fn):
        def candidate(*args, **kwargs):
            with fusedce.patch():
                return fn(*args, **kwargs)

        return candidate

    candidates = {op: patched(fn) for op, fn in testing.TORCH_FUNCTIONS.items()}
    grid = testing.default_grid()
    cases = testing.sample(grid, 250) + [c for c in grid if c.special][::20]
    assert {c.op for c in cases} == set(testing.OPS)
    report = testing.check(candidates, cases, label="patched")
    assert report.ok, report.details()


def _routed(fused_calls) -> bool:
    before = sum(fused_calls.values())
    F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]))
    return sum(fused_calls.values()) > before


def _torch_state():
    names = [(F, n) for n in ("cross_entropy", "nll_loss", "log_softmax", "softmax")]
    names += [(torch, n) for n in ("log_softmax", "softmax")] + [(torch.special, n) for n in ("log_softmax", "softmax")]
    names += [(torch.Tensor, n) for n in ("log_softmax", "softmax")]
    names += [(nn, n) for n in ("CrossEntropyLoss", "NLLLoss", "LogSoftmax", "Softmax")]
    attributes = {f"{getattr(space, '__name__', space)}.{n}": getattr(space, n) for space, n in names}
    return attributes, list(_get_current_function_mode_stack()), torch._C._is_torch_function_mode_enabled()


def test_torch_is_untouched_after_the_block_even_on_error(fused_calls):
    before = _torch_state()
    with fusedce.patch():
        assert _torch_state()[0] == before[0]  # nothing in torch is reassigned, even inside
        assert _routed(fused_calls)
    assert _torch_state() == before
    with pytest.raises(ValueError, match="inside"), fusedce.patch():
        raise ValueError("inside")
    assert _torch_state() == before
    assert not _routed(fused_calls)


def test_a_decorator_and_nesting(fused_calls):
    @fusedce.patch()
    def step(depth):
        assert len(_get_current_function_mode_stack()) == 1  # a nested block adds no second mode
        routed = _routed(fused_calls)
        return [routed, *step(depth - 1)] if depth else [routed]

    assert step(2) == [True, True, True]
    assert not _routed(fused_calls)
    with fusedce.patch():
        with fusedce.patch():
            assert _routed(fused_calls)
        assert _routed(fused_calls), "leaving the inner block keeps the outer one"
    assert not _routed(fused_calls)
    assert _get_current_function_mode_stack() == []


def test_other_modes_stack_with_it(fused_calls):
    seen = []

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    with fusedce.patch(), Recording():
        assert _routed(fused_calls)
    assert "cross_entropy" in seen


def test_other_threads_are_unaffected(fused_calls):
    inside, checked = threading.Event(), threading.Event()
    result = {}

    def other_thread():
        inside.wait()
        result["mode"] = torch._C._is_torch_function_mode_enabled()
        result["routed"] = _routed(fused_calls)
        checked.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with fusedce.patch():
        inside.set()
        checked.wait(timeout=60)
        assert _routed(fused_calls)
    worker.join()
    assert result == {"mode": False, "routed": False}
    assert set(fused_calls.threads) == {threading.get_ident()}


def test_a_block_in_another_thread_leaves_this_one_alone(fused_calls):
    entered, done = threading.Event(), threading.Event()

    def other_thread():
        with fusedce.patch():
            entered.set()
            done.wait(timeout=60)

    worker = threading.Thread(target=other_thread)
    worker.start()
    entered.wait(timeout=60)
    try:
        assert not _routed(fused_calls)
    finally:
        done.set()
        worker.join()


def test_a_function_compiled_inside_the_block_uses_fusedce():
    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def loss(x, t):
        return F.cross_entropy(x, t) + x.softmax(1).sum()

    x, t = torch.randn(4, 5), torch.tensor([0, 4, 1, 2])
    with fusedce.patch():
        inside = loss(x, t)
    outside = loss(x, t)  # the mode stack is guarded: this recompiles, with torch's ops
    assert len(graphs) == 2
    assert "torch.nn.functional.cross_entropy" not in graphs[0] and "softmax](" not in graphs[0]
    assert "torch.ops.fusedce.ce_forward" in graphs[0] and "torch.ops.fusedce.softmax_forward" in graphs[0]
    assert "torch.nn.functional.cross_entropy" in graphs[1]
    torch.testing.assert_close(inside, outside)


def test_backward_and_double_backward_inside_the_block(fused_calls):
    def second_order(x):
        loss = F.cross_entropy(x, TARGET, label_smoothing=0.1) + x.log_softmax(1).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (grad2,) = torch.autograd.grad(grad.pow(2).sum(), x)
        return loss, grad, grad2

    expected = second_order(_logits(torch.float64))
    with fusedce.patch():
        actual = second_order(_logits(torch.float64))
    assert fused_calls["cross_entropy"] == 1 and fused_calls["log_softmax"] == 1
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
