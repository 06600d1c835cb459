"""cross_entropy's LLM extras: z_loss, logit_softcap and return_lse.

The expected values come from a reference formula written with plain torch ops, in float64:

    x' = cap·tanh(x / cap)                       (x itself without a cap)
    loss = F.cross_entropy(x', target, weight, ignore_index, reduction, label_smoothing)
         + z · (logsumexp(x', class dim)² on the non-ignored rows, reduced like the loss: per row
                for 'none', summed for 'sum', and divided by the main loss's denominator, the
                non-ignored rows' summed target weights (their count without a weight), for 'mean')

and its gradients are autograd's through that formula. Every fused backend runs it (the triton
backend interpreted).

Liger-Kernel's documented definitions, which agree with ours where Liger has them:
* ``lse_square_scale`` (z-loss): ``z_loss = lse_square_scale · lse²`` per non-ignored row, with
  ``lse`` the log-sum-exp of the (soft-capped) logits, added to the row's loss unweighted; with
  reduction 'mean' it is divided by the number of non-ignored rows. Without a class weight that is
  our definition exactly (test_matches_liger_definitions); with one, Liger divides the z-term by
  the count and we by the summed target weights, the main loss's denominator.
* ``softcap``: the logits become ``softcap · tanh(x / softcap)`` before the loss, and the gradient
  is multiplied by ``1 - tanh²(x / softcap)``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fusedce
from fusedce.kernels import available_backends, use_backend

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]


def _capped(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def reference_formula(x, target, weight=None, ignore_index=-100, reduction="mean", smoothing=0.0,
                      z_loss=0.0, cap=None):
    """The extras with torch's own ops (see the module docstring)."""
    xc = _capped(x, cap)
    loss = F.cross_entropy(xc, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=smoothing)
    class_dim = 0 if x.dim() == 1 else 1
    lse = torch.logsumexp(xc, dim=class_dim)
    valid = target != ignore_index
    z_rows = torch.where(valid, z_loss * lse * lse, 0)
    if reduction == "none":
        return loss + z_rows
    if reduction == "sum":
        return loss + z_rows.sum()
    picked = torch.ones_like(z_rows) if weight is None else weight[torch.where(valid, target, 0)]
    denominator = torch.where(valid, picked, 0).sum()
    return loss + z_rows.sum() / denominator


# (input shape, class dim size): (N, C), K-dimensional (N, C, d1, d2), and unbatched (C,).
SHAPES = [(6, 7), (2, 5, 3, 2), (9,)]
EXTRAS = [(0.1, None), (0.0, 2.5), (0.05, 2.5)]  # (z_loss, logit_softcap)
WEIGHT_SMOOTHING = [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)]
REDUCTIONS = ["none", "mean", "sum"]


def _inputs(shape, dtype, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, classes, t_shape, generator=gen)
    if ignore and t.numel() > 1:
        t.view(-1)[1] = -100  # one ignored row
    w = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, w


_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (5e-2, 2e-2),
        torch.float16: (2e-2, 1e-2)}


def _check(backend, shape, dtype, weighted, smoothing, reduction, z, cap):
    x, t, w = _inputs(shape, dtype)
    weight = w if weighted else None
    x = x.requires_grad_()
    with use_backend(backend):
        out = fusedce.cross_entropy(x, t, weight=weight, reduction=reduction, label_smoothing=smoothing,
                                    z_loss=z, logit_softcap=cap)
    x64 = x.detach().double().requires_grad_()
    expected = reference_formula(x64, t, None if weight is None else weight.double(), -100, reduction,
                                 smoothing, z, cap)
    assert out.dtype == dtype and out.shape == expected.shape
    atol, rtol = _TOL[dtype]
    torch.testing.assert_close(out.double(), expected.detach(), atol=atol, rtol=rtol)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with use_backend(backend):
        (grad,) = torch.autograd.grad(out, x, upstream.to(dtype))
    (expected_grad,) = torch.autograd.grad(expected, x64, upstream)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), expected_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
# float32 is also checked by the strided, in-place, compile and return_lse tests; its full grid
# runs with --full-grid.
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)])
@pytest.mark.parametrize(("z", "cap"), EXTRAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_formula(backend, dtype, z, cap, reduction, shape):
    for weighted, smoothing in WEIGHT_SMOOTHING:
        _check(backend, shape, dtype, weighted, smoothing, reduction, z, cap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    for (z, cap), reduction in itertools.product(EXTRAS, REDUCTIONS):
        _check(backend, (6, 7), dtype, True, 0.1, reduction, z, cap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits(backend):
    """A transposed (class stride ≠ 1) and a sliced input: the kernels take any strides."""
    x, t, _ = _inputs((7, 40), torch.float32)
    for view in (x.t().contiguous().t(), x[:, ::2]):
        tt = t.clamp(max=view.shape[1] - 1)
        xv = view.detach().requires_grad_()
        with use_backend(backend):
            out = fusedce.cross_entropy(xv, tt, z_loss=0.02, logit_softcap=3.0, label_smoothing=0.1)
            (grad,) = torch.autograd.grad(out, xv)
        x64 = view.detach().double().requires_grad_()
        expected = reference_formula(x64, tt, smoothing=0.1, z_loss=0.02, cap=3.0)
        (expected_grad,) = torch.autograd.grad(expected, x64)
        torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(grad.double(), expected_grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, t, w = _inputs((4, 5, 2), torch.float64)
    x = x.requires_grad_()

    def loss(x):
        return fusedce.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=0.3, logit_softcap=2.0,
                                     reduction="none")

    fast = backend == "triton"  # interpreted: the full check's many calls take half a minute
    with use_backend(backend):
        assert gradcheck(loss, (x,), fast_mode=fast)
        # Double backward runs the differentiable reference formulas.
        assert gradgradcheck(loss, (x,), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("cap", [None, 2.5])
def test_return_lse(backend, dtype, cap):
    for shape in SHAPES:
        x, t, _ = _inputs(shape, dtype)
        with use_backend(backend):
            loss, lse = fusedce.cross_entropy(x, t, reduction="mean", logit_softcap=cap, return_lse=True)
            loss_none = fusedce.cross_entropy(x, t, reduction="none", logit_softcap=cap)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert lse.dtype == acc and lse.shape == loss_none.shape and not lse.requires_grad
        class_dim = 0 if x.dim() == 1 else 1
        # Every row, the ignored one included.
        expected = torch.logsumexp(_capped(x.double(), cap), dim=class_dim)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(lse.double(), expected, atol=tol, rtol=tol)
        # The loss it comes with is the loss of the same call without it.
        expected_loss = reference_formula(x.double(), t, reduction="mean", cap=cap)
        atol, rtol = _TOL[dtype]
        torch.testing.assert_close(loss.double(), expected_loss, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_with_z_loss_gives_the_z_term(backend):
    x, t, _ = _inputs((6, 7), torch.float64)
    with use_backend(backend):
        with_z, lse = fusedce.cross_entropy(x, t, reduction="none", z_loss=0.25, return_lse=True)
        without = fusedce.cross_entropy(x, t, reduction="none")
    valid = t != -100
    torch.testing.assert_close(with_z - without, torch.where(valid, 0.25 * lse**2, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults_are_bit_identical(backend, monkeypatch):
    """Spelling out the defaults changes nothing, bit for bit, in the loss or the gradient: they
    never reach the extras' Function (whose kernels round differently on the cpu backend)."""

    def refuse(*args):
        raise AssertionError("the default call reached the extras path")

    monkeypatch.setattr(fusedce._autograd, "cross_entropy_extras", refuse)
    for shape, reduction, (weighted, smoothing) in itertools.product(SHAPES, REDUCTIONS, WEIGHT_SMOOTHING):
        x, t, w = _inputs(shape, torch.float32)
        weight = w if weighted else None
        results = []
        for kwargs in ({}, {"z_loss": 0.0, "logit_softcap": None, "return_lse": False}):
            xi = x.clone().requires_grad_()
            with use_backend(backend):
                out = fusedce.cross_entropy(xi, t, weight=weight, reduction=reduction, label_smoothing=smoothing,
                                            **kwargs)
                out.sum().backward()
            results.append((out, xi.grad))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_liger_definitions(backend):
    """Liger's definitions, per row and then averaged over the non-ignored rows (no class weight)."""
    x, t, _ = _inputs((8, 11), torch.float64, seed=5)
    z, cap = 1e-2, 3.0
    valid = t != -100
    xc = cap * torch.tanh(x / cap)
    lse = torch.logsumexp(xc, dim=1)
    ce_rows = lse - xc.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    liger_mean = torch.where(valid, ce_rows + z * lse**2, 0).sum() / valid.sum()
    with use_backend(backend):
        ours = fusedce.cross_entropy(x, t, z_loss=z, logit_softcap=cap)
    torch.testing.assert_close(ours, liger_mean)
    # And the gradient Liger documents: (softmax(x') - onehot + 2z·lse·softmax(x'))·(1 - tanh²)/n.
    xg = x.clone().requires_grad_()
    with use_backend(backend):
        fusedce.cross_entropy(xg, t, z_loss=z, logit_softcap=cap).backward()
    p = xc.softmax(1)
    onehot = F.one_hot(t.clamp(min=0), 11).double()
    liger_grad = (p - onehot + 2 * z * lse.unsqueeze(1) * p) * (1 - torch.tanh(x / cap) ** 2)
    liger_grad = torch.where(valid.unsqueeze(1), liger_grad, 0) / valid.sum()
    torch.testing.assert_close(xg.grad, liger_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    x, t, w = _inputs((6, 7), torch.float32)
    grads = []
    for inplace in (False, True):
        xi = x.clone().requires_grad_()
        with use_backend(backend):
            fusedce.cross_entropy(xi * 1, t, weight=w, z_loss=0.1, logit_softcap=2.0,
                                  inplace_backward=inplace).backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_module():
    x, t, w = _inputs((2, 5, 3), torch.float64)
    module = fusedce.CrossEntropyLoss(weight=w, z_loss=0.1, logit_softcap=2.0, return_lse=True)
    assert "z_loss=0.1" in repr(module) and "logit_softcap=2.0" in repr(module)
    loss, lse = module(x, t)
    expected = fusedce.cross_entropy(x, t, weight=w, z_loss=0.1, logit_softcap=2.0, return_lse=True)
    assert torch.equal(loss, expected[0]) and torch.equal(lse, expected[1])
    torch.testing.assert_close(loss, reference_formula(x, t, w, z_loss=0.1, cap=2.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_torch_compile_fullgraph(backend, compile_backend):
    x, t, w = _inputs((8, 5), torch.float32)
    x = x.requires_grad_()

    def step(x):
        loss, lse = fusedce.cross_entropy(x, t, weight=w, z_loss=0.1, logit_softcap=2.0, return_lse=True)
        return loss + lse.sum()

    torch._dynamo.reset()
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().requires_grad_()
    expected = reference_formula(x64, t, w.double(), z_loss=0.1, cap=2.0)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    expected = expected + torch.logsumexp(_capped(x64, 2.0), 1).sum().detach()
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), expected_grad, atol=2e-5, rtol=2e-5)


def test_opcheck():
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    t = torch.randint(0, 7, (4, 3))
    w = torch.rand(7, dtype=torch.float64)
    ops = torch.ops.fusedce
    loss, stats = ops.ce_extras_forward(x, t, w, -100, 0.1, 0.2, 2.0)
    torch.library.opcheck(ops.ce_extras_forward, (x, t, w, -100, 0.1, 0.2, 2.0))
    torch.library.opcheck(ops.ce_extras_backward, (torch.ones_like(loss), x, t, w, stats, -100, 0.1, 0.2, 2.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z_loss": -0.1}, ValueError, "z_loss must be >= 0"),
        ({"z_loss": float("nan")}, ValueError, "z_loss must be finite"),
        ({"z_loss": True}, TypeError, "z_loss must be a real number"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap must be positive"),
        ({"logit_softcap": -1.0}, ValueError, "logit_softcap must be positive"),
        ({"logit_softcap": float("inf")}, ValueError, "logit_softcap must be finite"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    x, t, _ = _inputs((4, 5), torch.float32)
    with pytest.raises(error, match=match):
        fusedce.cross_entropy(x, t, **kwargs)


@pytest.mark.parametrize("kwargs", [{"z_loss": 0.1}, {"logit_softcap": 2.0}, {"return_lse": True}])
def test_probability_targets_are_refused(kwargs):
    x = torch.randn(4, 5)
    p = torch.rand(4, 5).softmax(1)
    with pytest.raises(NotImplementedError, match="class-index targets only"):
        fusedce.cross_entropy(x, p, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_and_vmap(backend):
    """Forward-mode AD and torch.func.vmap through the extras equal those of the reference formula."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) * 4  # a batch of 3 (N=4, C=5) calls
    t = torch.randint(0, 5, (3, 4), generator=gen)
    t[0, 1] = -100
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    tangent = torch.randn_like(x)
    kwargs = {"weight": w, "label_smoothing": 0.1, "reduction": "none"}

    def ours(x, t):
        return fusedce.cross_entropy(x, t, z_loss=0.2, logit_softcap=2.0, **kwargs)

    def formula(x, t):
        return reference_formula(x, t, w, -100, "none", 0.1, 0.2, 2.0)

    with use_backend(backend):
        out, jvp = torch.func.jvp(lambda x: ours(x, t[0]), (x[0],), (tangent[0],))
        batched = torch.func.vmap(ours)(x, t)
    expected, expected_jvp = torch.func.jvp(lambda x: formula(x, t[0]), (x[0],), (tangent[0],))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(jvp, expected_jvp)
    torch.testing.assert_close(batched, torch.stack([formula(x[i], t[i]) for i in range(3)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_rows(backend):
    """With one class p = 1: the cross-entropy part of the gradient is exactly 0 (formed in the
    reference's order), and what is left is the z-loss's 2z·lse·g·(1 - tanh²)."""
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(5, dtype=torch.long)
    with use_backend(backend):
        (plain,) = torch.autograd.grad(fusedce.cross_entropy(x, t, logit_softcap=2.0, label_smoothing=0.1), x)
        (with_z,) = torch.autograd.grad(fusedce.cross_entropy(x, t, logit_softcap=2.0, z_loss=0.5), x)
    if backend == "triton":  # takes 1-ε and ε/C as float32 pairs (split_scalar): 2^-48 off, not exact
        torch.testing.assert_close(plain, torch.zeros_like(plain), atol=1e-15, rtol=0)
    else:
        assert torch.equal(plain, torch.zeros_like(plain))
    th = torch.tanh(x.detach() / 2.0)
    torch.testing.assert_close(with_z, 2 * 0.5 * (2.0 * th) * (1 - th**2) / 5)
