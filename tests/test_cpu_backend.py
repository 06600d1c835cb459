"""C++ CPU backend cases that the shared kernel grid (test_kernels.py) does not reach.

Both execution paths of the C++ kernels are pinned here: the row path (class stride 1) and the
tile path (class stride ≠ 1: the K-dimensional contiguous case, channels-last outputs, arbitrary
strides), with shapes that put tile boundaries inside an outer index, empty inputs, one class,
large C, non-finite rows in the tile path, and thread-count independence.
"""

from __future__ import annotations

import pytest
import torch

from fusedce.kernels import _load, reference, unavailable_reason

from .helpers import TOLERANCES, assert_close_report


@pytest.fixture(scope="module")
def cpu():
    module = _load("cpu")
    if module is None:
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    return module


def _x(shape, dtype=torch.float32, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if layout == "class_last":  # class stride 1, inner stride C: channels-last
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    return x


def _target(outer, classes, inner, ignore_index=-100, seed=1):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (outer, inner), generator=gen)
    target.view(-1)[::5] = ignore_index
    return target


def _check_ce(cpu, x, target, weight=None, smoothing=0.0, ignore_index=-100, equal_nan_only=False):
    tol = TOLERANCES["kernel"][x.dtype]
    loss, stats = cpu.ce_forward(x, target, weight, ignore_index, smoothing)
    ref_loss, ref_stats = reference.ce_forward(x, target, weight, ignore_index, smoothing)
    assert_close_report(loss, ref_loss, tol, "loss")
    # The log-sum everywhere; the max where the log-sum is finite (a row holding NaN has a NaN
    # log-sum, which makes every result derived from it NaN whatever its max).
    assert_close_report(stats[..., 1], ref_stats[..., 1], tol, "log-sum")
    finite = ref_stats[..., 1].isfinite()
    assert_close_report(stats[..., 0][finite], ref_stats[..., 0][finite], tol, "max")
    grad_loss = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3))
    grad = cpu.ce_backward(grad_loss, x, target, weight, stats, ignore_index, smoothing, False)
    ref = reference.ce_backward(grad_loss, x, target, weight, ref_stats, ignore_index, smoothing, False)
    assert grad.is_contiguous() and grad.dtype == x.dtype
    assert_close_report(grad, ref, tol, "grad")
    x_copy = x.clone()  # keeps x's strides
    out = cpu.ce_backward(grad_loss, x_copy, target, weight, stats, ignore_index, smoothing, True)
    assert out.data_ptr() == x_copy.data_ptr()
    assert_close_report(x_copy, ref, tol, "inplace grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inner", [1, 3])
def test_large_classes(cpu, dtype, inner):
    """C = 40000: many vector steps per row (row path), and a tile of few rows (tile path)."""
    x = _x((3, 40000, inner), dtype)
    _check_ce(cpu, x, _target(3, 40000, inner), smoothing=0.1)


@pytest.mark.parametrize("layout", ["contiguous", "class_last"])
@pytest.mark.parametrize(
    "shape",
    [(3, 5, 257), (2, 21, 300), (1, 3, 17)],  # tiles cross outer boundaries; partial vectors
    ids=str,
)
def test_k_dimensional(cpu, shape, layout):
    outer, classes, inner = shape
    x = _x(shape, layout=layout)
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(5))
    _check_ce(cpu, x, _target(outer, classes, inner), weight=weight, smoothing=0.2)
    for op in ("log_softmax", "softmax"):
        out = getattr(cpu, f"{op}_forward")(x)
        assert_close_report(out, getattr(reference, f"{op}_forward")(x), (2e-5, 2e-5), f"{op} out")
        grad_out = _x(shape, seed=9, layout=layout)
        grad = getattr(cpu, f"{op}_backward")(grad_out, out)
        ref = getattr(reference, f"{op}_backward")(grad_out, out)
        assert grad.is_contiguous()
        assert_close_report(grad, ref, (2e-5, 2e-5), f"{op} grad")


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 5, 0), (0, 1, 1)], ids=str)
def test_empty(cpu, shape):
    outer, classes, inner = shape
    x = torch.randn(shape)
    target = torch.zeros(outer, inner, dtype=torch.long)
    loss, stats = cpu.ce_forward(x, target, None, -100, 0.0)
    assert loss.shape == (outer, inner) and stats.shape == (outer, inner, 2)
    grad = cpu.ce_backward(torch.ones(outer, inner), x, target, None, stats, -100, 0.0, False)
    assert grad.shape == shape
    assert cpu.nll_forward(x, target, None, -100).shape == (outer, inner)
    assert cpu.nll_backward(torch.ones(outer, inner), target, None, -100, classes, x.dtype).shape == shape
    assert cpu.softmax_forward(x).shape == shape
    assert cpu.log_softmax_backward(x, cpu.log_softmax_forward(x)).shape == shape


def test_no_classes(cpu):
    """C = 0, as reference: empty softmax outputs, -inf row stats and a 0 loss for probability
    targets, a 0 loss for index targets that are all ignored, an error for any other."""
    x = torch.randn(3, 0, 2)
    for op in ("log_softmax", "softmax"):
        out = getattr(cpu, f"{op}_forward")(x)
        assert out.shape == x.shape
        assert getattr(cpu, f"{op}_backward")(out, out).shape == x.shape
    loss, stats = cpu.ce_prob_forward(x, torch.randn(3, 0, 2), None, 0.0)
    ref_loss, ref_stats = reference.ce_prob_forward(x, torch.randn(3, 0, 2), None, 0.0)
    assert torch.equal(loss, ref_loss) and torch.equal(stats, ref_stats)
    ignored = torch.full((3, 2), -100)
    # Every target ignored: a 0 loss per row (and -inf stats), as torch gives; a target that is
    # not ignored has no class to be.
    for fn, args in (("ce_forward", (x, ignored, None, -100, 0.3)), ("nll_forward", (x, ignored, None, -100))):
        expected = getattr(reference, fn)(*args)
        actual = getattr(cpu, fn)(*args)
        for a, e in zip(actual if fn == "ce_forward" else (actual,), expected if fn == "ce_forward" else (expected,),
                        strict=True):
            assert torch.equal(a, e), fn
        assert torch.equal(expected[0] if fn == "ce_forward" else expected, torch.zeros(3, 2))
        with pytest.raises(IndexError, match="Target 0 is out of bounds"):
            getattr(cpu, fn)(x, torch.zeros(3, 2, dtype=torch.long), *args[2:])


@pytest.mark.parametrize("inner", [1, 4])
def test_one_class(cpu, inner):
    x = _x((5, 1, inner))
    target = torch.zeros(5, inner, dtype=torch.long)
    _check_ce(cpu, x, target, smoothing=0.3)
    out = cpu.log_softmax_forward(x)
    assert_close_report(out, reference.log_softmax_forward(x), (2e-5, 2e-5), "log_softmax")


@pytest.mark.parametrize("shape", [(64, 1000, 1), (4, 21, 300)], ids=str)
def test_thread_count_does_not_change_results(cpu, shape):
    x = _x(shape)
    target = _target(shape[0], shape[1], shape[2])
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loss, stats = cpu.ce_forward(x, target, None, -100, 0.1)
            grad = cpu.ce_backward(torch.ones_like(loss), x, target, None, stats, -100, 0.1, False)
            results.append((loss, stats, grad, cpu.softmax_forward(x)))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_uint8_targets(cpu):
    x = _x((6, 7, 1))
    target = torch.tensor([[0], [6], [3], [1], [2], [5]], dtype=torch.uint8)
    _check_ce(cpu, x, target, ignore_index=3)
    nll = cpu.nll_forward(x, target, None, 3)
    assert_close_report(nll, reference.nll_forward(x, target, None, 3), (2e-5, 2e-5), "nll")


def test_bfloat16_subnormal_gradients(cpu):
    """bfloat16 gradients that are subnormal stay subnormal, not zero: the row path's native
    float-to-bfloat16 conversion flushes subnormals, so the vectors holding one take ATen's."""
    classes = 64  # two full bfloat16 vectors: VecIO::store, not the scalar tail
    x = torch.zeros(3, classes, 1, dtype=torch.float64)
    x[:, 1:, 0] = torch.linspace(-88, -80, classes - 1, dtype=torch.float64)
    x = x.to(torch.bfloat16)
    target = torch.zeros(3, 1, dtype=torch.long)
    grad_loss = torch.full((3, 1), 2.0**-12)  # makes coef·p a float32 subnormal: down to ~1e-42
    _, stats = cpu.ce_forward(x, target, None, -100, 0.0)
    grad = cpu.ce_backward(grad_loss, x, target, None, stats, -100, 0.0, False).double()
    x64 = x.double()
    truth = grad_loss.double().unsqueeze(1) * torch.softmax(x64, dim=1)
    # The target's p - 1 = -rest / (1 + rest), rest = Σ of the other classes' exp (class 0, at 0,
    # is the max): float64's p - 1 rounds a -1e-34 to 0.
    rest = x64[:, 1:].exp().sum(dim=1)
    truth[:, 0] = -grad_loss.double() * rest / (1 + rest)
    tiny = torch.finfo(torch.bfloat16).tiny * torch.finfo(torch.bfloat16).eps  # the subnormal spacing
    assert (truth[:, 1:].abs() > 2 * tiny).any()
    err = (grad - truth).abs()
    bad = err > tiny + truth.abs() * 2.0**-8
    assert not bad.any(), f"{int(bad.sum())} gradients off, e.g. {grad[bad][:4].tolist()} vs {truth[bad][:4].tolist()}"


def test_non_finite_rows_tile_path(cpu):
    """The tile path (class stride = inner) gives NaN rows where reference does."""
    x = _x((2, 4, 5))
    x[0, :, 1] = float("-inf")  # an all -inf row
    x[1, 2, 3] = float("nan")
    x[0, 1, 2] = float("inf")
    x[1, 0, 0] = float("-inf")  # harmless away from the target
    target = torch.tensor([[1, 0, 2, 3, 1], [1, 2, 3, 0, 1]])
    loss, stats = cpu.ce_forward(x, target, None, -100, 0.0)
    ref_loss, ref_stats = reference.ce_forward(x, target, None, -100, 0.0)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    torch.testing.assert_close(stats, ref_stats, equal_nan=True)
    grad = cpu.ce_backward(torch.ones_like(loss), x, target, None, stats, -100, 0.0, False)
    ref = reference.ce_backward(torch.ones_like(loss), x, target, None, ref_stats, -100, 0.0, False)
    torch.testing.assert_close(grad, ref, equal_nan=True)
    for op in ("log_softmax", "softmax"):
        out = getattr(cpu, f"{op}_forward")(x)
        torch.testing.assert_close(out, getattr(reference, f"{op}_forward")(x), equal_nan=True)
        grad_out = torch.ones_like(x)
        torch.testing.assert_close(
            getattr(cpu, f"{op}_backward")(grad_out, out),
            getattr(reference, f"{op}_backward")(grad_out, out),
            equal_nan=True,
        )


def test_out_of_bounds_target_k_dimensional(cpu):
    """The first bad target in row order (o, then i) is named, in forward and in nll."""
    x = torch.randn(2, 4, 3)
    target = torch.tensor([[0, 1, 2], [9, 3, -5]])
    with pytest.raises(IndexError, match=r"^Target 9 is out of bounds\.$"):
        cpu.ce_forward(x, target, None, -100, 0.0)
    with pytest.raises(IndexError, match=r"^Target -5 is out of bounds\.$"):
        cpu.nll_forward(x, target, None, 9)
