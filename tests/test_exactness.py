"""Exact under hostile input (issue 8), on every backend: each result must be no further from the
float64 truth than torch's own result, element by element, plus a few ulp of the element.

* Shift invariance: logits that share a large common offset (log-probabilities formed as
  ``(x - max) - log Σ``, never ``x - rounded lse``).
* Small probability-target losses, which ``lse·Σt - Σt·x`` computes with catastrophic
  cancellation.
* uint8 targets compared as int64 values: ignore_index -100 is not class 156, 368 is not 112.
* An empty K-dimensional batch with a uint8 target under 'mean' and 'sum'.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce.kernels import available_backends, use_backend

BACKENDS = [pytest.param(name, id=name) for name in available_backends("cpu")]

# Slack beyond torch's own error, in ulp of the element's magnitude in the output dtype.
ULPS = 4


def assert_no_worse_than_torch(
    ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, what: str, scale: float = 0.0
) -> None:
    """Per element: ``|ours - truth| <= |torch - truth| + ULPS·eps·(|truth| + scale)``, and NaNs
    and infinities where torch has them.

    ``scale`` is the size of the terms an element is a difference or a sum of, where that exceeds
    the element: a gradient ``g - p·Σg`` (one ulp of difference in the saved forward output, a
    different but equally exact summation order, moves it by that much), or a loss
    ``Σ t·((m - x) + log Σ)``, whose ``log Σ`` is the log of a sum ``≥ 1`` rounded at the ulp of 1.
    """
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    a, b, t = ours.detach().double(), theirs.detach().double(), truth.detach().double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs from torch's"
    finite = b.isfinite()
    assert torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()), f"{what}: infinities differ"
    eps = torch.finfo(ours.dtype).eps
    tiny = torch.finfo(ours.dtype).tiny
    allowed = (b - t).abs() + ULPS * eps * (t.abs() + scale) + tiny
    excess = ((a - t).abs() - allowed).where(finite, 0)
    if (excess > 0).any():
        i = tuple(int(k) for k in (excess == excess.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {a.numel()} elements further from the float64 "
            f"truth than torch's; worst at {i}: ours {a[i].item()!r}, torch {b[i].item()!r}, "
            f"truth {t[i].item()!r}"
        )


def _layouts(x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(N, C, d) logits as contiguous (class stride d: the tile path), channels-last (class
    stride 1) and a transposed 2-D view (the row path reads rows of a strided tensor)."""
    n, c, d = x.shape
    return [
        ("kdim", x),
        ("class_last", x.permute(0, 2, 1).contiguous().permute(0, 2, 1)),
        ("rows", x.permute(0, 2, 1).reshape(n * d, c)),
        ("transposed", x.permute(0, 2, 1).reshape(n * d, c).t().contiguous().t()),
    ]


def _offset_logits(offset: float, classes: int = 300, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(offset) % 1000 + classes)
    return (torch.randn(3, classes, 4, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)


def _run(backend: str, fn, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The value and the gradient of ``fn(x, ...)`` under a fixed random upstream gradient."""
    leaf = x.detach().clone().requires_grad_()
    with use_backend(backend):
        out = fn(leaf, *args, **kwargs)
        upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    return out.detach(), grad


def _check_against_torch(backend, ours_fn, torch_fn, x, *args, value_scale=0.0, **kwargs):
    value, grad = _run(backend, ours_fn, x, *args, **kwargs)
    t_value, t_grad = _run("reference", torch_fn, x, *args, **kwargs)
    def up(a):
        return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    truth_args = [up(a) for a in args]
    truth_kwargs = {k: up(v) for k, v in kwargs.items()}
    truth_value, truth_grad = _run("reference", torch_fn, x.double(), *truth_args, **truth_kwargs)
    assert_no_worse_than_torch(value, t_value, truth_value, "value", value_scale)
    # A gradient element is a difference of terms of size up to 1 (p·coefficient and the target
    # weight, or g and p·Σg, with an upstream gradient in [0, 1)), or up to its largest element.
    grad_scale = max(1.0, float(truth_grad.abs().where(truth_grad.isfinite(), 0).max()))
    assert_no_worse_than_torch(grad, t_grad, truth_grad, "gradient", grad_scale)


@pytest.mark.parametrize("offset", [300.0, 60000.0])
@pytest.mark.parametrize("op", ["log_softmax", "softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_is_shift_invariant(backend, op, offset):
    x = _offset_logits(offset)
    for name, view in _layouts(x):
        dim = 1 if view.dim() == 3 else -1
        try:
            _check_against_torch(backend, getattr(fusedce, op), getattr(F, op), view, dim)
        except AssertionError as exc:
            raise AssertionError(f"{op} {name}: {exc}") from None


@pytest.mark.parametrize("offset", [300.0, 60000.0])
@pytest.mark.parametrize("extra", [{}, {"label_smoothing": 0.3}, {"label_smoothing": 0.3, "weight": True}],
                         ids=["plain", "smoothing", "smoothing_weight"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_is_shift_invariant(backend, extra, offset):
    x = _offset_logits(offset)
    kwargs = dict(extra)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    gen = torch.Generator().manual_seed(3)
    for name, view in _layouts(x):
        target = torch.randint(0, x.shape[1], (view.shape[0], *view.shape[2:]), generator=gen)
        for target_kind, tgt in (("index", target), ("prob", F.one_hot(target, x.shape[1]).movedim(-1, 1).float())):
            if target_kind == "prob":
                # Soft targets close to the prediction: a small loss, and every class weighs in.
                tgt = (0.9 * tgt + 0.1 * torch.rand(tgt.shape, generator=gen).softmax(1)).to(view.dtype)
            try:
                _check_against_torch(backend, fusedce.cross_entropy, F.cross_entropy, view, tgt,
                                     reduction="none", value_scale=2.0, **kwargs)
            except AssertionError as exc:
                raise AssertionError(f"{name} {target_kind}: {exc}") from None


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_probability_target_loss_keeps_its_digits(backend):
    """Targets equal to the model's own softmax: each row's loss is its entropy, and a peaked
    softmax makes that small. K-dimensional fp32, several column blocks on triton."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 700, 3, 2, generator=gen) * 0.5
    x[:, 5] += 14.0  # a confident prediction
    for offset in (0.0, 500.0):
        logits = x + offset
        target = logits.double().softmax(1).float()
        _check_against_torch(backend, fusedce.cross_entropy, F.cross_entropy, logits, target, reduction="none",
                             value_scale=1.0)


UINT8_CASES = [(-100, 156), (368, 112)]


@pytest.mark.parametrize("ignore_index,colliding_class", UINT8_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_targets_are_compared_as_int64(backend, ignore_index, colliding_class):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 200, generator=gen)
    target = torch.full((64,), colliding_class, dtype=torch.uint8)
    target[:32] = 3
    weight = torch.rand(200, generator=gen) + 0.5
    log_probs = x.log_softmax(1)
    for reduction in ("mean", "sum", "none"):
        for kwargs in ({}, {"weight": weight}):
            expected = F.cross_entropy(x, target.long(), ignore_index=ignore_index, reduction=reduction, **kwargs)
            expected_nll = F.nll_loss(log_probs, target.long(), ignore_index=ignore_index, reduction=reduction,
                                      **kwargs)
            with use_backend(backend):
                got = fusedce.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction, **kwargs)
                got_nll = fusedce.nll_loss(log_probs, target, ignore_index=ignore_index, reduction=reduction,
                                           **kwargs)
            what = f"{reduction} {'weighted' if kwargs else ''}"
            torch.testing.assert_close(got, expected, msg=lambda m, w=what: f"cross_entropy {w}: {m}")
            torch.testing.assert_close(got_nll, expected_nll, msg=lambda m, w=what: f"nll_loss {w}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_issue_example(backend):
    """The figures of issue 8: torch gives 5.8284 (mean) and 373.0177 (sum)."""
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(8))
    target = torch.full((64,), 156, dtype=torch.uint8)
    target[:32] = 3
    with use_backend(backend):
        mean = fusedce.cross_entropy(x, target)
        total = fusedce.cross_entropy(x, target, reduction="sum")
    torch.testing.assert_close(mean, F.cross_entropy(x, target.long()))
    torch.testing.assert_close(total, F.cross_entropy(x, target.long(), reduction="sum"))
    torch.testing.assert_close(total / mean, torch.tensor(64.0))  # no row is ignored


@pytest.mark.parametrize("shape", [(0, 10, 3), (0, 5, 2, 2), (2, 5, 0), (2, 0, 2, 3), (2, 0, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_kdim_batch_with_uint8_target(backend, shape):
    """torch returns NaN ('mean') or 0 ('sum') for an empty target, and raises for 'none', and for
    rows without classes, (2, 0, 2, 3), even reduced."""
    x = torch.randn(shape)
    target = torch.zeros((shape[0], *shape[2:]), dtype=torch.uint8)
    weight = torch.rand(shape[1])
    for fn, ours in ((F.cross_entropy, fusedce.cross_entropy), (F.nll_loss, fusedce.nll_loss)):
        for kwargs in ({}, {"weight": weight}, {"label_smoothing": 0.1, "weight": weight}):
            if fn is F.nll_loss and "label_smoothing" in kwargs:
                continue
            for reduction in ("mean", "sum", "none"):
                try:
                    expected = fn(x, target, reduction=reduction, **kwargs)
                except RuntimeError as exc:
                    with use_backend(backend), pytest.raises(RuntimeError, match=str(exc)):
                        ours(x, target, reduction=reduction, **kwargs)
                    continue
                with use_backend(backend):
                    got = ours(x, target, reduction=reduction, **kwargs)
                torch.testing.assert_close(got, expected, equal_nan=True)


def _confident_logits(shape: tuple[int, ...], hot: int = 3) -> torch.Tensor:
    """float32 logits of scale 1 with class ``hot`` (dim 1) 20 above the rest: the row's sum of
    exponentials is ``1 + rest`` with ``rest`` about ``C·e^-20``, far below the ulp of 1."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x.select(1, hot).add_(20.0)
    return x.float()


# Row path (C >= 32), tile path (C < 32, and K-dimensional), several Triton column blocks.
CONFIDENT_SHAPES = [(4, 10), (4, 1000), (2, 700, 3)]


@pytest.mark.parametrize("shape", CONFIDENT_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_row_keeps_the_digits_of_its_log_sum(backend, shape):
    """The loss of a confident row's own class, its log-probability, and a near-one-hot
    probability target's loss are all ``log1p(rest)`` (plus the target's small terms): they must
    keep their relative digits. ``log(1 + rest)`` rounded the sum at the ulp of 1 first, and kept
    none of them (torch does: its relative error here is 1e-2 to 1)."""
    x = _confident_logits(shape)
    hot = torch.full((shape[0], *shape[2:]), 3)
    classes = shape[1]
    near_one_hot = F.one_hot(hot, classes).movedim(-1, 1).double() * (1 - 1e-6) + 1e-6 / classes
    with use_backend(backend):
        results = {
            "index loss": (fusedce.cross_entropy(x, hot, reduction="none"),
                           F.cross_entropy(x.double(), hot, reduction="none")),
            "log p of the class": (fusedce.log_softmax(x, 1).select(1, 3),
                                   F.log_softmax(x.double(), 1).select(1, 3)),
            "probability-target loss": (fusedce.cross_entropy(x, near_one_hot.float(), reduction="none"),
                                        F.cross_entropy(x.double(), near_one_hot, reduction="none")),
        }
    for what, (ours, truth) in results.items():
        relative = ((ours.double() - truth) / truth).abs().max().item()
        assert relative <= 8 * torch.finfo(torch.float32).eps, f"{what}: relative error {relative:.3g}"


@pytest.mark.parametrize("shape", CONFIDENT_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_softmax_backward_of_a_confident_row(backend, shape):
    """softmax's gradient ``y·(g - Σ g·y)`` on confident rows, where the bracket cancels to about
    the size of the small probabilities: it must be what the float64 formula gives on the same
    (float32) output, to an eps of the tensor's largest element. A float32 ``Σ g·y`` is off by an
    ulp of ``g``, thousands of times that (torch's own is)."""
    x = _confident_logits(shape).requires_grad_()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with use_backend(backend):
        y = fusedce.softmax(x, 1)
        (grad,) = torch.autograd.grad(y, x, upstream)
    exact = torch._softmax_backward_data(upstream.double(), y.detach().double(), 1, torch.float64)
    error = (grad.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert error <= 2 * torch.finfo(torch.float32).eps * scale, f"error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("ignore_index,colliding_class", [*UINT8_CASES, (256, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_target_under_label_smoothing(backend, ignore_index, colliding_class):
    """torch's smoothing term masks the rows whose target equals ignore_index in the target's
    dtype (a uint8 156 equals -100 there), while its NLL term compares in int64: such a row keeps
    its NLL and loses its smoothing term, and 'mean' divides each term by its own count."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 300, generator=gen)
    target = torch.randint(0, 256, (12,), generator=gen, dtype=torch.uint8)
    target[::3] = colliding_class
    for reduction in ("mean", "sum", "none"):
        leaf, theirs_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = F.cross_entropy(theirs_leaf, target, ignore_index=ignore_index, label_smoothing=0.4,
                                   reduction=reduction)
        with use_backend(backend):
            got = fusedce.cross_entropy(leaf, target, ignore_index=ignore_index, label_smoothing=0.4,
                                        reduction=reduction)
        torch.testing.assert_close(got, expected, msg=lambda m, r=reduction: f"{r}: {m}")
        upstream = torch.ones_like(expected)
        torch.testing.assert_close(torch.autograd.grad(got, leaf, upstream)[0],
                                   torch.autograd.grad(expected, theirs_leaf, upstream)[0])
