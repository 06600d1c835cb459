"""The triton backend on CUDA tensors against the reference kernels (skipped without CUDA).

``test_kernels.py`` checks the triton kernels under the interpreter on CPU tensors; this file runs
the compiled kernels. Each distinct launch configuration is one Triton compilation (about a
second), so the grid here is a deliberate subset: every op, every dtype, the three tiling layouts
(one row per program, many rows per program, INNER_TILE), and the cases that are CUDA-only
(poisoned out-of-bounds targets, a Llama-3 sized vocabulary).
"""

from __future__ import annotations

import pytest
import torch

from fusedce.kernels import _load, reference

from .helpers import TOLERANCES, OpRecorder, assert_close_report, lane_hostile_rows, layouts, targets_with_ignored

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="module")
def backend():
    module = _load("triton")
    if module is None:
        pytest.skip("the triton backend is unavailable")
    return module


def _copy_to(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same strides and storage offset, even when it is not
    dense (``Tensor.to`` would make a non-dense tensor contiguous)."""
    storage = t.new_empty(0).set_(t.untyped_storage()).to(device, copy=True)
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


def _check_ops(backend, x, target, weight, ignore_index, smoothing, what):
    """Every op of the backend on CUDA tensors against the reference on the same tensors."""
    tol = TOLERANCES["kernel"][x.dtype]
    outer, classes, inner = x.shape
    loss, lse = backend.ce_forward(x, target, weight, ignore_index, smoothing)
    ref_loss, ref_lse = reference.ce_forward(x, target, weight, ignore_index, smoothing)
    assert_close_report(loss, ref_loss, tol, f"{what} ce loss")
    assert_close_report(lse, ref_lse, tol, f"{what} ce lse")
    grad_loss = torch.rand(outer, inner, dtype=ref_lse.dtype, device=x.device)
    grad = backend.ce_backward(grad_loss, x, target, weight, lse, ignore_index, smoothing, False)
    ref = reference.ce_backward(grad_loss, x, target, weight, ref_lse, ignore_index, smoothing, False)
    assert grad.dtype == x.dtype and grad.is_contiguous()
    assert_close_report(grad, ref, tol, f"{what} ce grad")
    # The 'mean' case: a broadcast upstream gradient, written into x itself.
    scalar = torch.tensor(0.5, dtype=ref_lse.dtype, device=x.device).expand(outer, inner)
    x_copy = _copy_to(x, x.device)
    assert x_copy.stride() == x.stride()
    out = backend.ce_backward(scalar, x_copy, target, weight, lse, ignore_index, smoothing, True)
    assert out.data_ptr() == x_copy.data_ptr()
    ref = reference.ce_backward(scalar, x, target, weight, ref_lse, ignore_index, smoothing, False)
    assert_close_report(x_copy, ref, tol, f"{what} ce inplace grad")

    prob = torch.softmax(torch.randn(x.shape, dtype=torch.float64, device=x.device), 1).to(x.dtype)
    loss, lse = backend.ce_prob_forward(x, prob, weight, smoothing)
    ref_loss, ref_lse = reference.ce_prob_forward(x, prob, weight, smoothing)
    assert_close_report(loss, ref_loss, tol, f"{what} prob loss")
    grad = backend.ce_prob_backward(grad_loss, x, prob, weight, lse, smoothing, False)
    ref = reference.ce_prob_backward(grad_loss, x, prob, weight, ref_lse, smoothing, False)
    assert_close_report(grad, ref, tol, f"{what} prob grad")

    loss = backend.nll_forward(x, target, weight, ignore_index)
    assert_close_report(loss, reference.nll_forward(x, target, weight, ignore_index), tol, f"{what} nll")
    grad = backend.nll_backward(grad_loss, target, weight, ignore_index, classes, x.dtype)
    ref = reference.nll_backward(grad_loss, target, weight, ignore_index, classes, x.dtype)
    assert_close_report(grad, ref, tol, f"{what} nll grad")

    grad_out = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    for op in ("log_softmax", "softmax"):
        out = getattr(backend, f"{op}_forward")(x)
        ref = getattr(reference, f"{op}_forward")(x)
        assert out.is_contiguous()
        assert_close_report(out, ref, tol, f"{what} {op}")
        grad = getattr(backend, f"{op}_backward")(grad_out, ref)
        assert_close_report(grad, getattr(reference, f"{op}_backward")(grad_out, ref), tol, f"{what} {op} grad")


# (shape, which layouts): the multi-block row kernel, the many-rows kernel and INNER_TILE.
SHAPES = [((5, 1500, 1), ("contiguous", "strided")), ((3, 21, 37), ("contiguous", "class_last"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "wanted"), SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_ops_match_reference(backend, dtype, shape, wanted):
    full = dtype in (torch.float32, torch.bfloat16)  # the other dtypes: one layout, one case
    for layout, x_cpu in layouts(shape, dtype):
        if layout not in wanted or (not full and layout != "contiguous"):
            continue
        x = _copy_to(x_cpu, "cuda")
        assert x.stride() == x_cpu.stride()
        cases = [(True, 2, 0.1), (False, -100, 0.0)] if full else [(True, 2, 0.1)]
        for use_weight, ignore_index, smoothing in cases:
            target = targets_with_ignored(shape, ignore_index).cuda()
            weight = torch.rand(shape[1], dtype=torch.float64).to(dtype).cuda() if use_weight else None
            what = f"{layout} w={use_weight} ignore={ignore_index} eps={smoothing}"
            _check_ops(backend, x, target, weight, ignore_index, smoothing, what)


def test_non_finite_rows(backend):
    x = torch.randn(5, 6, 1, device="cuda")
    x[0] = float("-inf")
    x[1, 2] = float("inf")
    x[2, 3] = float("nan")
    x[3, 4] = float("-inf")
    target = torch.tensor([[0], [1], [2], [0], [1]], device="cuda")
    loss, lse = backend.ce_forward(x, target, None, -100, 0.0)
    ref_loss, ref_lse = reference.ce_forward(x, target, None, -100, 0.0)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, equal_nan=True)
    assert loss[:3].isnan().all() and loss[3:].isfinite().all()
    out = backend.log_softmax_forward(x)
    assert out[:3].isnan().all() and out[3, 4].item() == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lane_statistics_on_hostile_rows(backend, dtype):
    """row_lse's per-lane max and sum (softmax, log_softmax, the reduced loss) on the GPU's own
    tiles (bfloat16: 4096-wide, 2048 lanes; float32: 2048), where max skips NaN: offsets, ties
    across lanes, -inf masks, +inf and NaN after -inf (tests/helpers.py)."""
    x = lane_hostile_rows(5000).to(dtype).cuda()
    target = (torch.arange(x.shape[0]) * 7 % 5000).cuda()
    tol = TOLERANCES["kernel"][dtype]
    for op in ("softmax_forward", "log_softmax_forward"):
        ours = getattr(backend, op)(x.unsqueeze(2))
        theirs = getattr(reference, op)(x.unsqueeze(2))
        assert_close_report(ours, theirs, tol, op)
    for mean in (True, False):
        loss, stats, _ = backend.ce_reduced_forward(x[:6], target[:6], -100, mean)
        ref_loss, ref_stats = reference.ce_forward(x[:6].unsqueeze(2), target[:6].unsqueeze(1), None, -100, 0.0)
        total = ref_loss.sum() / (6 if mean else 1)
        assert_close_report(loss, total.to(dtype), tol, "reduced loss")
        assert_close_report(stats, ref_stats, tol, "reduced stats")
        _, stats, _ = backend.ce_reduced_forward(x, target, -100, mean)
        ref_stats = reference.ce_forward(x.unsqueeze(2), target.unsqueeze(1), None, -100, 0.0)[1]
        assert_close_report(stats, ref_stats, tol, "stats of every row")


def test_out_of_bounds_targets_poison_the_row(backend):
    """On CUDA there is no host check: an out-of-range target gives a NaN loss and gradient row,
    and the CUDA context survives (torch would raise a device-side assert)."""
    x = torch.randn(4, 5, 1, device="cuda")
    target = torch.tensor([[0], [7], [-100], [-3]], device="cuda")
    loss, lse = backend.ce_forward(x, target, None, -100, 0.0)
    assert loss[[1, 3]].isnan().all() and loss[0].isfinite().all() and loss[2].item() == 0.0
    grad = backend.ce_backward(torch.ones(4, 1, device="cuda"), x, target, None, lse, -100, 0.0, False)
    assert grad[[1, 3]].isnan().all() and grad[[0, 2]].isfinite().all()
    nll = backend.nll_forward(x, target, None, -100)
    assert nll[[1, 3]].isnan().all() and nll[[0, 2]].isfinite().all()
    grad = backend.nll_backward(torch.ones(4, 1, device="cuda"), target, None, -100, 5, x.dtype)
    assert grad[[1, 3]].isnan().all() and grad[[0, 2]].isfinite().all()
    torch.cuda.synchronize()  # the context is still usable


def test_segmentation_uint8targets_with_ignored(backend):
    """(16, 21, 128·128) with a uint8 target and the 255 void label: the INNER_TILE kernel at size."""
    x = torch.randn(16, 21, 128 * 128, device="cuda")
    target = torch.randint(0, 21, (16, 128 * 128), dtype=torch.uint8, device="cuda")
    target[:, ::17] = 255
    weight = torch.rand(21, device="cuda")
    tol = TOLERANCES["kernel"][torch.float32]
    loss, lse = backend.ce_forward(x, target, weight, 255, 0.0)
    ref_loss, ref_lse = reference.ce_forward(x, target, weight, 255, 0.0)
    assert_close_report(loss, ref_loss, tol, "seg loss")
    grad_loss = torch.rand(16, 128 * 128, device="cuda")
    grad = backend.ce_backward(grad_loss, x, target, weight, lse, 255, 0.0, False)
    assert_close_report(
        grad, reference.ce_backward(grad_loss, x, target, weight, ref_lse, 255, 0.0, False), tol, "seg grad"
    )


def test_llama3_vocabulary_bf16(backend):
    """16384 × 128256 bf16 (4.2 GB of logits): forward and backward against the reference on a few
    rows (the reference computes them in fp32), and the invariant Σ_c grad = 0 on every row."""
    check_large_vocabulary(backend, 16384, 128256, "cuda")


def check_large_vocabulary(backend, rows: int, classes: int, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(rows, classes, 1, device=device, generator=gen) * 2).to(torch.bfloat16)
    target = torch.randint(0, classes, (rows, 1), device=device, generator=gen)
    target[::7] = -100
    smoothing = 0.1
    loss, lse = backend.ce_forward(x, target, None, -100, smoothing)
    picked = torch.tensor([0, 1, 7, rows // 4 + 1, rows - 1], device=device)
    ref_loss, ref_lse = reference.ce_forward(x[picked], target[picked], None, -100, smoothing)
    assert_close_report(lse[picked], ref_lse, (1e-4, 1e-5), "lse")
    assert_close_report(loss[picked], ref_loss, (1e-4, 1e-5), "loss")
    assert loss.isfinite().all() and lse.isfinite().all()

    count = (target != -100).sum()
    grad_loss = (1.0 / count).float().expand(rows, 1)  # 'mean': broadcast, zero strides
    grad = backend.ce_backward(grad_loss, x, target, None, lse, -100, smoothing, False)
    ref = reference.ce_backward(grad_loss[picked], x[picked], target[picked], None, ref_lse, -100, smoothing, False)
    assert_close_report(grad[picked].float() * count, ref.float() * count, (1e-6, 1.6e-2), "grad")
    row_sums = grad.sum(dim=1, dtype=torch.float32) * count
    assert row_sums.abs().max().item() < 1e-2, "Σ_c grad is not 0"
    assert (grad[::7] == 0).all(), "ignored rows must have a zero gradient"

    backend.ce_backward(grad_loss, x, target, None, lse, -100, smoothing, True)
    assert torch.equal(x, grad), "the in-place gradient differs from the out-of-place one"


# --------------------------------------------------------------------------------------------
# The cached launcher (``launcher.py``) against the plain ``kernel[grid](...)`` launch
# --------------------------------------------------------------------------------------------


def _every_family(backend, x, target, prob, weight):
    """One output per kernel of the backend (cross entropy with index and probability targets,
    with the extras, nll, softmax and log_softmax; forward and backward), cloned."""
    outer, classes, inner = x.shape
    acc = torch.float32
    gen = torch.Generator(device=x.device).manual_seed(0)
    grad_loss = torch.rand(outer, inner, dtype=acc, device=x.device, generator=gen)
    grad_out = torch.randn(x.shape, dtype=torch.float32, device=x.device, generator=gen).to(x.dtype)
    out = {}
    out["ce"], lse = backend.ce_forward(x, target, weight, 2, 0.1)
    out["ce_grad"] = backend.ce_backward(grad_loss, x, target, weight, lse, 2, 0.1, False)
    out["ex"], ex_lse = backend.ce_extras_forward(x, target, weight, -100, 0.0, 1e-4, 30.0)
    out["ex_grad"] = backend.ce_extras_backward(grad_loss, x, target, weight, ex_lse, -100, 0.0, 1e-4, 30.0, False)
    out["prob"], prob_lse = backend.ce_prob_forward(x, prob, weight, 0.1)
    out["prob_grad"] = backend.ce_prob_backward(grad_loss, x, prob, weight, prob_lse, 0.1, False)
    out["nll"] = backend.nll_forward(x, target, weight, 2)
    out["nll_grad"] = backend.nll_backward(grad_loss, target, weight, 2, classes, x.dtype)
    for op in ("log_softmax", "softmax"):
        out[op] = getattr(backend, f"{op}_forward")(x)
        out[f"{op}_grad"] = getattr(backend, f"{op}_backward")(grad_out, out[op])
    return {name: t.clone() for name, t in out.items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 48])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_cached_launcher_matches_the_plain_launch(backend, dtype, rows, offset):
    """Each kernel family through ``FUSEDCE_TRITON_LAUNCH=plain`` and through the cached launcher
    gives the same bits, and the cached launcher is used (its counter moves) once a
    specialisation is known: a row count of 1 and of 16·k, 16-byte aligned and misaligned data."""
    from fusedce.kernels.triton import launcher

    if launcher.fast_path_unavailable() is not None:
        pytest.skip(f"the cached launcher is unavailable: {launcher.fast_path_unavailable()}")
    classes = 300
    gen = torch.Generator(device="cuda").manual_seed(rows + offset)
    flat = torch.randn(rows * classes + offset, dtype=torch.float32, device="cuda", generator=gen).to(dtype)
    x = flat[offset:].view(rows, classes, 1)  # an element offset: misaligned for offset=1
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    target = torch.randint(0, classes, (rows, 1), device="cuda", generator=gen)
    prob = torch.softmax(torch.randn(x.shape, device="cuda", generator=gen), 1).to(dtype)
    weight = torch.rand(classes, dtype=dtype, device="cuda", generator=gen)
    try:
        launcher.set_mode("plain")
        plain = _every_family(backend, x, target, prob, weight)
        launcher.set_mode("fast")
        _every_family(backend, x, target, prob, weight)  # the first call per key is a plain one
        before = dict(launcher.counters)
        fast = _every_family(backend, x, target, prob, weight)
        torch.cuda.synchronize()
    finally:
        launcher.set_mode(None)
    assert launcher.counters["fast"] - before["fast"] >= len(plain)  # one launch or more per output
    assert launcher.counters["plain"] == before["plain"]
    different = [name for name in plain if not _same_bits(plain[name], fast[name])]
    assert not different, f"the cached launcher changed {different}"


# ---- the fused plain (N, C) 'mean'/'sum' loss (kernels/triton/reduced.py) -------------------------

# (rows, classes) -> the GPU tiling's programs: ImageNet (8192 programs, several of the last
# program's fold steps), one row per program over several column blocks, many rows per program,
# and one program.
REDUCED_SHAPES = [(16384, 1000), (37, 5000), (300, 10), (5, 3)]


def _reduced_inputs(rows, classes, dtype, ignore_index=-100):
    gen = torch.Generator(device="cuda").manual_seed(rows + classes)
    x = (torch.randn(rows, classes, device="cuda", generator=gen, dtype=torch.float32) * 3).to(dtype)
    target = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
    target[::4] = ignore_index
    return x, target


def _check_reduced(backend, x, target, ignore_index, mean):
    """The fused forward and backward against the reference composite (_ops) in float64, the
    truth; the gradient against the reference composite in x's dtype too."""
    from fusedce import _ops

    loss, stats, denominator = backend.ce_reduced_forward(x, target, ignore_index, mean)
    truth = _ops._ce_reduced_forward(reference, x.double(), target, ignore_index, mean)
    truth_loss, truth_denominator = truth[0], truth[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert (loss.dtype, loss.shape, denominator.dtype, denominator.shape) == (x.dtype, (), acc, ())
    assert stats.shape == (x.shape[0], 1, 2) and stats.dtype == acc
    assert denominator.item() == truth_denominator.item()
    assert_close_report(loss, truth_loss.to(x.dtype) if x.dtype != acc else truth_loss,
                        TOLERANCES["kernel"][x.dtype], "reduced loss")
    ref_loss, ref_stats, ref_denominator = _ops._ce_reduced_forward(reference, x, target, ignore_index, mean)
    assert_close_report(loss, ref_loss, TOLERANCES["kernel"][x.dtype], "reduced loss vs the composite")
    grad_out = torch.tensor(1.7, dtype=x.dtype, device="cuda")
    grad = backend.ce_reduced_backward(grad_out, x, target, stats, denominator, ignore_index)
    ref_grad = _ops._ce_reduced_backward(reference, grad_out, x, target, ref_stats, ref_denominator, ignore_index)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    assert_close_report(grad, ref_grad, TOLERANCES["kernel"][x.dtype], "reduced grad")
    return loss, stats, denominator, grad


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REDUCED_SHAPES, ids=[f"{r}x{c}" for r, c in REDUCED_SHAPES])
def test_reduced_matches_reference(backend, shape, dtype, mean):
    x, target = _reduced_inputs(*shape, dtype)
    _check_reduced(backend, x, target, -100, mean)


def test_reduced_imagenet_grid_and_determinism(backend):
    """16384 × 1000 fp32 (the ImageNet bench shape): more than one program, and every call gives
    the same bits (the partials are folded in a fixed order) with the ticket counter back at 0."""
    from fusedce.kernels.triton import _common, reduced

    x, target = _reduced_inputs(16384, 1000, torch.float32)
    tiling = reduced._tiling(16384, 1000, (x.stride(1),), x.element_size(), "cuda", _common.MAX_BLOCK_C)
    assert tiling.grid > reduced._BLOCK_P
    first_loss, first_stats, first_denominator, first_grad = _check_reduced(backend, x, target, -100, True)
    for _ in range(5):
        loss, stats, denominator = backend.ce_reduced_forward(x, target, -100, True)
        grad = backend.ce_reduced_backward(torch.tensor(1.7, device="cuda"), x, target, stats, denominator, -100)
        assert torch.equal(loss, first_loss) and torch.equal(stats, first_stats)
        assert torch.equal(denominator, first_denominator) and torch.equal(grad, first_grad)
        assert reduced._counter(x).item() == 0


def test_reduced_edge_cases(backend):
    """No kept row: NaN mean (torch's 0/0), 0 sum, zero gradient. An out-of-bounds target poisons
    the loss (NaN) instead of asserting on the device. A strided x and target."""
    x, target = _reduced_inputs(300, 10, torch.float32)
    ignored = torch.full_like(target, 3)
    loss, _, denominator, grad = _check_reduced(backend, x, ignored, 3, True)
    assert loss.isnan().item() and denominator.item() == 0 and not grad.any()
    loss, _, _, _ = _check_reduced(backend, x, ignored, 3, False)
    assert loss.item() == 0
    bad = target.clone()
    bad[5] = 10
    loss, _, _ = backend.ce_reduced_forward(x, bad, -100, True)
    assert loss.isnan().item()
    x_strided = x.t().contiguous().t()
    _check_reduced(backend, x_strided, target.repeat_interleave(2)[::2], -100, True)
    for rows, classes in ((0, 5), (4, 0)):  # the composite's edges
        empty_x = torch.zeros(rows, classes, device="cuda")
        loss, _, _ = backend.ce_reduced_forward(empty_x, torch.full((rows,), -100, device="cuda"), -100, True)
        assert loss.isnan().item()


def test_reduced_on_two_streams(backend):
    """Launches on two streams at once use two ticket counters; both results stay right."""
    x1, t1 = _reduced_inputs(16384, 1000, torch.float32)
    x2, t2 = _reduced_inputs(4096, 1000, torch.float32)
    expected = [backend.ce_reduced_forward(x, t, -100, True)[0] for x, t in ((x1, t1), (x2, t2))]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results: list = [[], []]
    for _ in range(10):
        for k, (s, (x, t)) in enumerate(zip(streams, ((x1, t1), (x2, t2)), strict=True)):
            with torch.cuda.stream(s):
                results[k].append(backend.ce_reduced_forward(x, t, -100, True)[0])
    torch.cuda.synchronize()
    for k in range(2):
        for value in results[k]:
            assert torch.equal(value, expected[k])


def test_reduced_in_a_cuda_graph(backend):
    """Captured in a CUDA graph (its own zeroed counter, in the graph), replayed twice."""
    x, target = _reduced_inputs(16384, 1000, torch.float32)
    expected = backend.ce_reduced_forward(x, target, -100, True)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.ce_reduced_forward(x, target, -100, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend.ce_reduced_forward(x, target, -100, True)[0]
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_functional_fast_path_on_cuda(reduction):
    """fusedce.cross_entropy on CUDA takes the fused ops (one each way) and matches torch."""
    import fusedce

    x, target = _reduced_inputs(16384, 1000, torch.float32)
    x.requires_grad_(True)
    with OpRecorder() as recorder:
        loss = fusedce.cross_entropy(x, target, reduction=reduction)
    assert recorder.ops == ["fusedce.ce_reduced_forward"]
    (grad,) = torch.autograd.grad(loss, x)
    expected = torch.nn.functional.cross_entropy(x.double(), target, reduction=reduction)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close_report(loss, expected.float(), TOLERANCES["kernel"][torch.float32], "loss")
    assert_close_report(grad, expected_grad, TOLERANCES["kernel"][torch.float32], "grad")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
def test_an_unbatched_ignored_target_gives_torchs_cuda_zero(op, weighted):
    """torch's CUDA kernel for one unbatched sample returns 0 for an ignored target ('mean'),
    where its CPU kernel returns NaN; a valid target of weight 0 is NaN on both."""
    import fusedce

    x = torch.randn(7, device="cuda", requires_grad=True)
    weight = torch.rand(7, device="cuda") if weighted else None
    for target, zero_weight in ((torch.tensor(-100, device="cuda"), False), (torch.tensor(3, device="cuda"), True)):
        w = weight
        if zero_weight and w is not None:
            w = w.clone()
            w[3] = 0.0
        ours = getattr(fusedce, op)(x, target, weight=w)
        theirs = getattr(torch.nn.functional, op)(x, target, weight=w)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        (g_ours,) = torch.autograd.grad(ours, x)
        (g_theirs,) = torch.autograd.grad(theirs, x)
        torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)
