"""fusedce.linear_cross_entropy and LinearCrossEntropyLoss: parity with a small block size,
autograd (gradcheck, gradgradcheck, forward AD, torch.func, torch.compile), block-size
independence, and that nothing of the logits' size is ever saved or allocated.

The parity grid with the default block size runs in tests/test_parity.py, with the other ops.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import fusedce
from fusedce import testing, use_backend
from fusedce.kernels import available_backends
from fusedce.linear import ops as linear_ops
from fusedce.testing import linear_grid

from .helpers import OpRecorder

Options = torch.nn.LinearCrossEntropyOptions
LINEAR_GRID = linear_grid.linear_cases()
SAMPLE_EVERY = {"reference": 8, "cpu": 4, "triton": 80}


def _chunked(chunk: int) -> Any:
    return functools.partial(fusedce.linear_cross_entropy, options=Options(batch_chunk_size=chunk))


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_parity_with_two_row_blocks(backend):
    """Blocks of two rows: every case runs the block loop several times."""
    cases = testing.sample(LINEAR_GRID, SAMPLE_EVERY[backend])
    with use_backend(backend):
        report = testing.check({"linear_cross_entropy": _chunked(2)}, cases, label=backend)
    assert report.ok, f"{report.summary()}\n{report.details(15)}"


def test_checker_catches_a_wrong_candidate():
    """The linear grid can fail: a candidate that drops the bias is caught."""

    def no_bias(input, linear_weight, target, *, linear_bias=None, **kwargs):
        return fusedce.linear_cross_entropy(input, linear_weight, target, **kwargs)

    cases = [c for c in LINEAR_GRID if c.layout.endswith("+bias") and not c.special][:10]
    assert not testing.check(no_bias, cases).ok


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"bias": True, "out_features": (3, 2), "label_smoothing": 0.1},
                                    {"reduction": "none", "ignore_index": 1, "bias": True}])
def test_module_matches_torch(kwargs):
    torch.manual_seed(0)
    ours = fusedce.LinearCrossEntropyLoss(6, 5, **kwargs)
    theirs = torch.nn.LinearCrossEntropyLoss(6, 5, **kwargs)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.state_dict().items())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6)
    target = torch.randint(0, 5, (4, *kwargs.get("out_features", ())))
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    ours(x, target).sum().backward()
    theirs(x, target).sum().backward()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight": torch.ones(3)}, "expected weight shape to be (5,), got (3,)"),
    ({"label_smoothing": 1.5}, "expected label_smoothing to be in range [0, 1], got 1.5"),
])
def test_module_constructor_errors(kwargs, message):
    for cls in (fusedce.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss):
        with pytest.raises(RuntimeError) as info:
            cls(6, 5, **kwargs)
        assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _float64_case(prob: bool, out_features: tuple[int, ...] = (2,)) -> tuple[tuple[torch.Tensor, ...], Any]:
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, *out_features, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, *out_features, dtype=torch.float64, requires_grad=True)
    if prob:
        t = torch.randn(7, 4, *out_features, dtype=torch.float64).softmax(1).requires_grad_()
        cw = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
        return (x, w, b, t, cw), None
    t = torch.randint(0, 4, (7, *out_features))
    t.view(-1)[::3] = -100
    return (x, w, b), (t, torch.rand(4, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_and_gradgradcheck(prob, reduction):
    args, fixed = _float64_case(prob)

    def loss(x, w, b, *rest):
        target, weight = rest if prob else fixed
        return fusedce.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                                            label_smoothing=0.1, options=Options(batch_chunk_size=3))

    assert gradcheck(loss, args, check_forward_ad=True)
    assert gradgradcheck(loss, args)


def test_unbatched_gradcheck():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, w: fusedce.linear_cross_entropy(x, w, torch.tensor(2)), (x, w), check_forward_ad=True)


def test_second_backward_recomputes():
    """The gradients forward precomputes are consumed once; retain_graph still gives the same
    gradients a second time."""
    (x, w, b), (t, cw) = _float64_case(False)
    loss = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w, b), torch.tensor(2.0, dtype=torch.float64))
    for g1, g2 in zip(first, second, strict=True):
        torch.testing.assert_close(2 * g1, g2)


def test_torch_func_grad_and_create_graph():
    (x, w, b), (t, cw) = _float64_case(False)

    def loss(x, w):
        return fusedce.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.2)

    def reference(x, w):
        return F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.2)

    torch.testing.assert_close(torch.func.grad(loss)(x, w), torch.func.grad(reference)(x, w))
    hessian_row = torch.autograd.grad(torch.autograd.grad(loss(x, w), x, create_graph=True)[0].sum(), w)
    expected = torch.autograd.grad(torch.autograd.grad(reference(x, w), x, create_graph=True)[0].sum(), w)
    torch.testing.assert_close(hessian_row, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(9, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    t = torch.randint(0, 5, (9,))

    def loss(fn, x, w, b, t):
        return fn(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)

    compiled = torch.compile(functools.partial(loss, fusedce.linear_cross_entropy), fullgraph=True,
                             backend="aot_eager")
    ours = compiled(x, w, b, t)
    theirs = loss(F.linear_cross_entropy, x, w, b, t)
    torch.testing.assert_close(ours, theirs)
    upstream = torch.rand_like(ours)
    for g1, g2 in zip(torch.autograd.grad(ours, (x, w, b), upstream),
                      torch.autograd.grad(theirs, (x, w, b), upstream), strict=True):
        torch.testing.assert_close(g1, g2)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_results_do_not_depend_on_the_block_size(prob):
    torch.manual_seed(0)
    x = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(23, 6, dtype=torch.float64).softmax(1) if prob else torch.randint(0, 6, (23,))
    results = []
    for options in (None, Options(batch_chunk_size=1), Options(batch_chunk_size=5), Options(batch_chunk_size=100)):
        loss = fusedce.linear_cross_entropy(x, w, t, label_smoothing=0.1, options=options)
        results.append((loss, *torch.autograd.grad(loss, (x, w))))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class _Recorder(TorchDispatchMode):
    """Records the storage size (in elements) of every tensor each op returns (views of no
    storage, such as an expanded scalar, count for what they hold), and how often each op ran. The chunked
    passes are run inside the mode (not as one opaque op), so their own allocations are seen."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == "linear_ce_forward":
            with self:
                out = linear_ops._forward_kernel(*args, **kwargs)
        elif name == "linear_ce_backward":
            with self:
                out = linear_ops._backward_kernel(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and "out" not in kwargs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nothing_of_the_logits_size_is_saved_or_allocated(reduction):
    rows, classes, hidden, chunk = 64, 40, 8, 4
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(classes, hidden, requires_grad=True)
    t = torch.randint(0, classes, (rows,))
    saved: list[int] = []

    def run(fn, **kwargs):
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s, lambda s: s)
        with hooks, _Recorder() as recorder:
            loss = fn(x, w, t, reduction=reduction, **kwargs)
            loss.backward(torch.ones_like(loss))
        return recorder

    ours = run(fusedce.linear_cross_entropy, options=Options(batch_chunk_size=chunk))
    assert saved and max(saved) < rows * classes
    assert ours.largest <= max(chunk * classes, classes * hidden, rows * hidden)
    # One matmul per block (into the reused buffer, or through oneDNN as a block-sized new
    # tensor, see fusedce/linear/matmul.py): forward, plus backward for 'none'.
    blocks = math.ceil(rows / chunk)
    matmuls = ("mm", "addmm", "_linear_pointwise")
    assert sum(ours.calls.get(name, 0) for name in matmuls) >= blocks
    saved.clear()
    eager = run(F.linear_cross_entropy)  # the test can fail: torch's reference path is caught
    assert eager.largest >= rows * classes and max(saved) >= rows * classes


def test_block_rows_follow_the_budget_and_the_request():
    from fusedce.linear.chunked import block_rows

    cpu = torch.device("cpu")
    assert block_rows(4096, 32000, torch.float32, cpu, None) == 128  # (16 << 20) // (32000 * 4), to 64s
    assert block_rows(4096, 32000, torch.float32, cpu, 300) == 300
    assert block_rows(10, 32000, torch.float32, cpu, 300) == 10
    assert block_rows(10, 7, torch.float32, cpu, None) == 10
    # half precision on CPU: larger blocks (each one widens the weight gradient into float32)
    assert block_rows(4096, 32000, torch.bfloat16, cpu, None) == 1024  # (64 << 20) // (32000 * 2), to 64s
    # CUDA: whole matmul tiles of rows, and at least 256 of them (a Llama-3 head in bf16: 384 rows,
    # 94 MiB a block; in float32: 256 rows).
    cuda = torch.device("cuda")
    assert block_rows(16384, 128256, torch.bfloat16, cuda, None) == 384
    assert block_rows(16384, 128256, torch.float32, cuda, None) == 256
    assert block_rows(16384, 1000, torch.float32, cuda, None) == 16384
    assert block_rows(100, 128256, torch.float32, cuda, None) == 100
    assert block_rows(16384, 128256, torch.bfloat16, cuda, 1000) == 1000


def test_bench_providers_agree_on_the_micro_lmhead():
    """The lmhead providers of ``python -m fusedce bench`` compute the same loss and gradients."""
    from fusedce.bench.providers import providers
    from fusedce.bench.workloads import make_inputs, workloads

    (micro,) = [w for w in workloads("cpu") if w.key == "linear_cross_entropy/micro-lmhead/fp32"]
    results = {}
    for provider in providers(micro, "cpu", ["fusedce", "torch-chunked", "eager"]):
        inputs = make_inputs(micro, "cpu")
        loss = provider.forward(inputs)
        provider.backward(loss, inputs)
        assert inputs.linear_weight is not None and inputs.linear_weight.grad is not None
        results[provider.name] = (loss, inputs.x.grad, inputs.linear_weight.grad)
    assert set(results) == {"fusedce", "torch-chunked", "eager"}
    for name in ("fusedce", "torch-chunked"):
        for ours, theirs in zip(results[name], results["eager"], strict=True):
            torch.testing.assert_close(ours, theirs)


def test_a_unit_upstream_gradient_skips_the_scaling_of_the_precomputed_gradients():
    """``loss.backward()`` hands the backward exactly 1: the gradients forward computed are returned
    as they are, with no multiply over the weight gradient; any other upstream value scales them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen, requires_grad=True)
    w = torch.randn(300, 16, generator=gen, requires_grad=True)
    target = torch.randint(0, 300, (64,), generator=gen)

    loss = fusedce.linear_cross_entropy(x, w, target)
    with OpRecorder() as seen:
        loss.backward()
    assert not [n for n in seen.ops if n.startswith("aten.mul")], seen.ops
    once = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    (fusedce.linear_cross_entropy(x, w, target) * 3).backward()
    torch.testing.assert_close(x.grad, 3 * once[0])
    torch.testing.assert_close(w.grad, 3 * once[1])
