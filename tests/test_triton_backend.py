"""Triton-specific cases that the shared kernel suite does not reach: the online log-sum-exp across
many column blocks (with -inf, +inf and NaN blocks in every position), the INNER_TILE layout with
ragged tiles, empty and single-class inputs, uint8 targets, the int64 class offsets, and the launch
heuristics for the GPU workloads.

These run on CPU tensors under ``TRITON_INTERPRET=1`` and are skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

from fusedce.kernels import _load, available_backends, reference

from .helpers import TOLERANCES, assert_close_report, lane_hostile_rows

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("cpu"),
    reason="the triton backend runs on CPU tensors only under TRITON_INTERPRET=1",
)


@pytest.fixture
def triton_backend():
    return _load("triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Column blocks of 16 classes, so that a row of a few dozen classes spans several blocks."""
    from fusedce.kernels.triton import _common

    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    return _common


def _all_ops(backend, x, target, weight, smoothing, ignore_index=-100):
    """Every op's outputs on (x, target), from one backend, by name."""
    out = {}
    out["loss"], out["stats"] = backend.ce_forward(x, target, weight, ignore_index, smoothing)
    ref_stats = reference.ce_forward(x, target, weight, ignore_index, smoothing)[1]
    grad_loss = torch.linspace(0.5, 1.5, target.numel(), dtype=ref_stats.dtype).view(target.shape)
    out["grad"] = backend.ce_backward(grad_loss, x, target, weight, ref_stats, ignore_index, smoothing, False)
    prob = torch.softmax(torch.arange(x.numel(), dtype=torch.float64).view(x.shape).sin(), 1).to(x.dtype)
    out["prob_loss"], _ = backend.ce_prob_forward(x, prob, weight, smoothing)
    out["prob_grad"] = backend.ce_prob_backward(grad_loss, x, prob, weight, ref_stats, smoothing, False)
    out["nll"] = backend.nll_forward(x, target, weight, ignore_index)
    out["log_softmax"] = backend.log_softmax_forward(x)
    out["softmax"] = backend.softmax_forward(x)
    return out


def _compare(x, target, weight=None, smoothing=0.0, ignore_index=-100, backend=None):
    ours = _all_ops(backend, x, target, weight, smoothing, ignore_index)
    ref = _all_ops(reference, x, target, weight, smoothing, ignore_index)
    tol = TOLERANCES["kernel"][x.dtype]
    for name, value in ours.items():
        assert value.dtype == ref[name].dtype, name
        expected = ref[name]
        if name.endswith("stats"):
            # The log-sum everywhere; the max where the log-sum is finite (a row holding NaN has a
            # NaN log-sum, which makes every result derived from it NaN whatever its max).
            finite = expected[..., 1].isfinite().unsqueeze(-1).expand_as(expected).clone()
            finite[..., 1] = True
            value, expected = value[finite], expected[finite]
        assert_close_report(value, expected, tol, name)


# --------------------------------------------------------------------------------------------
# online log-sum-exp over many blocks
# --------------------------------------------------------------------------------------------


def test_online_lse_non_finite_blocks(triton_backend, small_blocks):
    """Rows of 70 classes in blocks of 16: -inf blocks first, a late max, +inf or NaN in a late block,
    all -inf, and a -inf logit away from the target."""
    classes = 70
    x = torch.randn(8, classes, 1) * 4
    x[0, :48] = float("-inf")  # three -inf blocks, then finite values
    x[1, :64] = float("-inf")  # only the last (ragged) block is finite
    x[2, 65] = 30.0  # the max arrives in the last block: every earlier sum is rescaled
    x[3, 50] = float("inf")
    x[4, 33] = float("nan")
    x[5] = float("-inf")
    x[6, 5] = float("-inf")
    target = torch.tensor([[60], [66], [1], [0], [0], [3], [7], [69]])
    _compare(x, target, backend=triton_backend)
    _compare(x, target, smoothing=0.1, backend=triton_backend)
    loss, stats = triton_backend.ce_forward(x, target, None, -100, 0.0)
    logsum = stats[..., 1]  # NaN exactly where the row has no finite max
    assert logsum[:2].isfinite().all() and logsum[3:6].isnan().all() and logsum[6:].isfinite().all()
    assert loss[3:6].isnan().all() and loss[[0, 1, 2, 6, 7]].isfinite().all()


@pytest.mark.parametrize("block", [16, 4096])
def test_lane_lse_hostile_rows(triton_backend, monkeypatch, block):
    """row_lse (softmax, log_softmax, the reduced loss) keeps a running max and sum per lane and
    combines the lanes once per row; with 4096-wide tiles it runs 2048 lanes. Its row stats and
    results match the reference's on rows built to break that combination."""
    from fusedce.kernels.triton import _common

    monkeypatch.setattr(_common, "MAX_BLOCK_C", block)
    classes = 5000 if block == 4096 else 70
    x = lane_hostile_rows(classes)
    target = torch.arange(x.shape[0]) * 7 % classes
    _compare(x.unsqueeze(2), target.unsqueeze(1), backend=triton_backend)
    for mean in (True, False):
        finite = slice(0, 6)  # rows 6 to 9 make the total NaN
        loss, lse, _ = triton_backend.ce_reduced_forward(x[finite], target[finite], -100, mean)
        ref_loss, ref_lse, _ = reference_reduced(x[finite], target[finite], mean)
        assert_close_report(loss, ref_loss, TOLERANCES["kernel"][x.dtype], "reduced loss")
        assert_close_report(lse, ref_lse, TOLERANCES["kernel"][x.dtype], "reduced stats")
        loss, lse, _ = triton_backend.ce_reduced_forward(x, target, -100, mean)
        assert loss.isnan()
        assert_close_report(lse, reference_reduced(x, target, mean)[1], TOLERANCES["kernel"][x.dtype], "stats")


def reference_reduced(x, target, mean):
    from fusedce._ops import _ce_reduced_forward

    return _ce_reduced_forward(reference, x, target, -100, mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_online_lse_large_offsets(triton_backend, small_blocks, dtype):
    """Logits around ±1e4 whose max moves from block to block."""
    ramp = torch.linspace(-1e4, 1e4, 100, dtype=torch.float64).view(1, -1, 1)
    x = (torch.randn(4, 100, 1, dtype=torch.float64) + ramp).to(dtype)
    x[1] = x[1].flip(0)
    target = torch.tensor([[0], [50], [99], [3]])
    _compare(x, target, backend=triton_backend)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 129), (2, 5, 1), (1, 300, 65)], ids=str)
def test_inner_tile_ragged(triton_backend, shape):
    """NCHW inputs: INNER_TILE programs whose last tile is partial, and a multi-block class loop."""
    from fusedce.kernels.triton._common import plan

    x = torch.randn(shape)
    outer, classes, inner = shape
    tiling = plan(outer, classes, inner, (x.stride(1),), (x.stride(2),), x.element_size(), x.device)
    assert tiling.inner_tile == (shape[2] > 1)
    weight = torch.rand(shape[1])
    target = torch.randint(0, shape[1], (shape[0], shape[2]))
    target.view(-1)[::5] = 2
    _compare(x, target, weight, 0.1, ignore_index=2, backend=triton_backend)
    # Classes innermost (channels-last): flat row tiles with a unit class stride.
    x_cl = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    _compare(x_cl, target, weight, 0.0, backend=triton_backend)


def test_inplace_into_channels_last(triton_backend):
    x = torch.randn(2, 4, 9, 5).to(memory_format=torch.channels_last).flatten(2)
    target = torch.randint(0, 4, (2, 45))
    _, stats = reference.ce_forward(x, target, None, -100, 0.05)
    grad_loss = torch.full((2, 45), 0.25)
    expected = reference.ce_backward(grad_loss, x, target, None, stats, -100, 0.05, False)
    x_copy = x.clone()
    assert x_copy.stride() == x.stride()
    out = triton_backend.ce_backward(grad_loss, x_copy, target, None, stats, -100, 0.05, True)
    assert out.data_ptr() == x_copy.data_ptr() and out.stride() == x.stride()
    assert_close_report(x_copy, expected, TOLERANCES["kernel"][torch.float32], "inplace")
    # The probability-target backward in place as well.
    prob = torch.softmax(torch.randn(x.shape), 1)
    expected = reference.ce_prob_backward(grad_loss, x, prob, None, stats, 0.05, False)
    x_copy = x.clone()
    triton_backend.ce_prob_backward(grad_loss, x_copy, prob, None, stats, 0.05, True)
    assert_close_report(x_copy, expected, TOLERANCES["kernel"][torch.float32], "prob inplace")


def test_int64_class_offsets(triton_backend, small_blocks, monkeypatch):
    """The COL_I64 variant (class offsets past 2^31), forced on a small input."""
    monkeypatch.setattr(small_blocks, "_INT32_MAX", 0)
    x = torch.randn(3, 40, 6)
    target = torch.randint(0, 40, (3, 6))
    _compare(x, target, torch.rand(40), 0.2, backend=triton_backend)


# --------------------------------------------------------------------------------------------
# edge shapes and target dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5, 1), (3, 5, 0), (4, 1, 1), (2, 1, 3)], ids=str)
def test_empty_and_single_class(triton_backend, shape):
    x = torch.randn(shape)
    target = torch.zeros(shape[0], shape[2], dtype=torch.long)
    _compare(x, target, torch.rand(shape[1]), 0.1, backend=triton_backend)
    grad = triton_backend.nll_backward(torch.ones(shape[0], shape[2]), target, None, -100, shape[1], x.dtype)
    assert grad.shape == shape
    out = triton_backend.softmax_backward(torch.randn(shape), reference.softmax_forward(x))
    assert out.shape == shape


def test_uint8_targets(triton_backend):
    x = torch.randn(6, 11, 2)
    target = torch.randint(0, 11, (6, 2), dtype=torch.uint8)
    target[0, 0] = 255  # ignore_index=255 is the usual segmentation "void" label
    _compare(x, target, torch.rand(11), 0.1, ignore_index=255, backend=triton_backend)
    grad_loss = torch.rand(6, 2)
    for weight in (None, torch.rand(11)):
        assert_close_report(
            triton_backend.nll_backward(grad_loss, target, weight, 255, 11, torch.float16),
            reference.nll_backward(grad_loss, target, weight, 255, 11, torch.float16),
            TOLERANCES["kernel"][torch.float16],
            "nll grad",
        )


def test_prob_target_zero_at_minus_inf(triton_backend):
    """A zero target at a -inf logit makes the loss NaN (0·inf), as in the reference."""
    x = torch.randn(3, 5, 1)
    x[0, 1] = float("-inf")
    x[1, 2] = float("-inf")
    target = torch.softmax(torch.randn(3, 5, 1), 1)
    target[0, 1] = 0.0
    loss, _ = triton_backend.ce_prob_forward(x, target, None, 0.0)
    ref, _ = reference.ce_prob_forward(x, target, None, 0.0)
    assert_close_report(loss, ref, TOLERANCES["kernel"][torch.float32], "loss")
    assert loss[0].isnan().all() and torch.isinf(loss[1]).all() and loss[2].isfinite().all()


def test_ignored_nan_row_keeps_nan_gradient(triton_backend):
    """g = 0 multiplies the bracket: an ignored row whose log-sum is NaN still has a NaN gradient."""
    x = torch.randn(3, 4, 1)
    x[1, 0] = float("nan")
    target = torch.tensor([[0], [-100], [2]])
    loss, stats = triton_backend.ce_forward(x, target, None, -100, 0.0)
    assert loss[1].item() == 0.0
    grad = triton_backend.ce_backward(torch.ones(3, 1), x, target, None, stats, -100, 0.0, False)
    ref = reference.ce_backward(torch.ones(3, 1), x, target, None, stats, -100, 0.0, False)
    assert_close_report(grad, ref, TOLERANCES["kernel"][torch.float32], "grad")
    assert grad[1].isnan().all() and grad[[0, 2]].isfinite().all()


# --------------------------------------------------------------------------------------------
# launch heuristics (host only: no GPU needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((16384, 128256, 1), torch.bfloat16, (1, 4096, False, 16384)),
        ((4096, 32000, 1), torch.float32, (1, 2048, False, 4096)),
        ((16384, 1000, 1), torch.float32, (2, 1024, False, 8192)),
        ((16, 21, 128 * 128), torch.float32, (64, 32, True, 16 * 256)),
        ((256, 10, 1), torch.float32, (128, 16, False, 2)),
    ],
    ids=str,
)
def test_gpu_tiling(shape, dtype, expected):
    from fusedce.kernels.triton._common import plan

    itemsize = torch.empty((), dtype=dtype).element_size()
    outer, classes, inner = shape
    strides = (inner, 1) if inner > 1 else (1, 1)
    tiling = plan(outer, classes, inner, (strides[0],), (strides[1],), itemsize, torch.device("cuda"))
    assert (tiling.block_r, tiling.block_c, tiling.inner_tile, tiling.grid) == expected
    assert not tiling.col_i64
    assert 1 <= tiling.num_warps <= 8


def test_out_of_bounds_targets_poison_without_host_check(triton_backend, monkeypatch):
    """What CUDA does (no host check there): an out-of-range target gives a NaN loss and gradient
    row; ignored and in-range rows are unaffected."""
    monkeypatch.setattr(reference, "check_targets", lambda *args: None)
    x = torch.randn(4, 5, 1)
    target = torch.tensor([[0], [7], [-100], [-3]])
    loss, stats = triton_backend.ce_forward(x, target, torch.rand(5), -100, 0.1)
    assert loss[[1, 3]].isnan().all() and loss[0].isfinite().all() and loss[2].item() == 0.0
    grad = triton_backend.ce_backward(torch.ones(4, 1), x, target, None, stats, -100, 0.0, False)
    assert grad[[1, 3]].isnan().all() and grad[[0, 2]].isfinite().all()
    nll = triton_backend.nll_forward(x, target, None, -100)
    assert nll[[1, 3]].isnan().all() and nll[[0, 2]].isfinite().all()
    grad = triton_backend.nll_backward(torch.ones(4, 1), target, None, -100, 5, x.dtype)
    assert grad[[1, 3]].isnan().all() and grad[[0, 2]].isfinite().all()


def test_no_classes(triton_backend):
    """C = 0, as reference: empty softmax outputs and gradients, -inf row stats and a 0 loss for
    probability targets, a 0 loss for index targets that are all ignored, an error for any other."""
    x = torch.randn(3, 0, 2)
    for op in ("log_softmax", "softmax"):
        out = getattr(triton_backend, f"{op}_forward")(x)
        assert out.shape == x.shape
        assert getattr(triton_backend, f"{op}_backward")(out, out).shape == x.shape
    prob = torch.randn(3, 0, 2)
    loss, stats = triton_backend.ce_prob_forward(x, prob, None, 0.0)
    ref_loss, ref_stats = reference.ce_prob_forward(x, prob, None, 0.0)
    assert torch.equal(loss, ref_loss) and torch.equal(stats, ref_stats)
    assert triton_backend.ce_prob_backward(torch.ones(3, 2), x, prob, None, stats, 0.1, False).shape == x.shape
    ignored = torch.full((3, 2), -100)
    assert triton_backend.ce_backward(torch.ones(3, 2), x, ignored, None, stats, -100, 0.0, False).shape == x.shape
    # Every target ignored: a 0 loss per row (and -inf stats), as torch gives; a target that is
    # not ignored has no class to be.
    for fn, args in (("ce_forward", (x, ignored, None, -100, 0.3)), ("nll_forward", (x, ignored, None, -100))):
        expected = getattr(reference, fn)(*args)
        actual = getattr(triton_backend, fn)(*args)
        for a, e in zip(actual if fn == "ce_forward" else (actual,), expected if fn == "ce_forward" else (expected,),
                        strict=True):
            assert torch.equal(a, e), fn
        assert torch.equal(expected[0] if fn == "ce_forward" else expected, torch.zeros(3, 2))
        with pytest.raises(IndexError, match="Target 0 is out of bounds"):
            getattr(triton_backend, fn)(x, torch.zeros(3, 2, dtype=torch.long), *args[2:])
