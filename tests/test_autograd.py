"""Autograd completeness: gradcheck, gradgradcheck, forward AD, torch.func, torch.compile and
opcheck, on every backend. Each property is one test body, parametrized over the calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import use_backend
from fusedce.kernels import available_backends

BACKENDS = available_backends("cpu")


def _inputs(shape=(4, 5, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    rows = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    target = torch.randint(0, num_classes, rows, generator=gen)
    if target.dim():
        target.view(-1)[::4] = 2  # ignored below
    prob = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(1 if len(shape) > 1 else 0)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5
    return x, target, prob.requires_grad_(), weight


# (name, function of (x, target, prob, weight) returning a tuple of differentiable inputs, fn)
CALLS = {
    "ce_index_w_eps_ignore": lambda x, t, p, w: (
        (x,), lambda x: fusedce.cross_entropy(x, t, weight=w, ignore_index=2, label_smoothing=0.2)),
    "ce_index_none": lambda x, t, p, w: ((x,), lambda x: fusedce.cross_entropy(x, t, reduction="none")),
    # The plain (N, C) call takes functional's one-op fast path (a strided 2-D view here).
    "ce_index_2d_mean": lambda x, t, p, w: ((x,), lambda x: fusedce.cross_entropy(x[:, :, 0], t[:, 0])),
    "ce_index_2d_sum_ignore": lambda x, t, p, w: (
        (x,), lambda x: fusedce.cross_entropy(x[:, :, 1], t[:, 1], ignore_index=2, reduction="sum")),
    "ce_prob_w_eps": lambda x, t, p, w: (
        (x, p, w.clone().requires_grad_()),
        lambda x, p, w: fusedce.cross_entropy(x, p, weight=w, label_smoothing=0.3)),
    "ce_prob_none": lambda x, t, p, w: ((x, p), lambda x, p: fusedce.cross_entropy(x, p, reduction="none")),
    "nll": lambda x, t, p, w: ((x,), lambda x: fusedce.nll_loss(x, t, weight=w, ignore_index=2)),
    "log_softmax": lambda x, t, p, w: ((x,), lambda x: fusedce.log_softmax(x, 1)),
    "softmax": lambda x, t, p, w: ((x,), lambda x: fusedce.softmax(x, -1)),
}
TORCH_CALLS = {
    "ce_index_w_eps_ignore": lambda x, t, p, w: F.cross_entropy(x, t, weight=w, ignore_index=2, label_smoothing=0.2),
    "ce_index_none": lambda x, t, p, w: F.cross_entropy(x, t, reduction="none"),
    "ce_index_2d_mean": lambda x, t, p, w: F.cross_entropy(x[:, :, 0], t[:, 0]),
    "ce_index_2d_sum_ignore": lambda x, t, p, w: F.cross_entropy(x[:, :, 1], t[:, 1], ignore_index=2, reduction="sum"),
    "ce_prob_w_eps": lambda x, t, p, w: F.cross_entropy(x, p, weight=w, label_smoothing=0.3),
    "ce_prob_none": lambda x, t, p, w: F.cross_entropy(x, p, reduction="none"),
    "nll": lambda x, t, p, w: F.nll_loss(x, t, weight=w, ignore_index=2),
    "log_softmax": lambda x, t, p, w: F.log_softmax(x, 1),
    "softmax": lambda x, t, p, w: F.softmax(x, -1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CALLS)
def test_gradcheck_and_gradgradcheck(backend, name):
    args, fn = CALLS[name](*_inputs())
    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CALLS)
def test_forward_ad(backend, name):
    args, fn = CALLS[name](*_inputs())
    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False, check_batched_grad=False)


# One call per op, written once against a namespace: ``fusedce.functional`` or torch's.
SAMPLE_CALLS = {
    "ce_index": lambda ns, x, t, p, w: ns.cross_entropy(x, t, weight=w, ignore_index=2, label_smoothing=0.2),
    "ce_prob": lambda ns, x, t, p, w: ns.cross_entropy(x, p, weight=w, label_smoothing=0.3),
    "nll": lambda ns, x, t, p, w: ns.nll_loss(x, t, weight=w, ignore_index=2),
    "log_softmax": lambda ns, x, t, p, w: ns.log_softmax(x, 0),
    "softmax": lambda ns, x, t, p, w: ns.softmax(x, 0),
}
TRANSFORMS = {
    # per-sample losses, and per-sample weights
    "vmap": lambda f, x, t, p, w: torch.func.vmap(f, in_dims=(0, 0, 0, None))(x, t, p, w),
    "vmap_weight": lambda f, x, t, p, w: torch.func.vmap(f)(x, t, p, w.expand(x.shape[0], -1) * 1.0),
    # per-sample gradients
    "vmap_grad": lambda f, x, t, p, w: torch.func.vmap(
        torch.func.grad(lambda *a: f(*a).sum()), in_dims=(0, 0, 0, None))(x, t, p, w),
    "jacrev": lambda f, x, t, p, w: torch.func.jacrev(lambda x: f(x, t[0], p[0], w))(x[0]),
    "jvp": lambda f, x, t, p, w: torch.func.jvp(lambda x: f(x, t[0], p[0], w), (x[0],), (p[0],))[1],
    "jvp_of_grad": lambda f, x, t, p, w: torch.func.jvp(
        torch.func.grad(lambda x: f(x, t[0], p[0], w).sum()), (x[0],), (p[0],))[1],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name", SAMPLE_CALLS)
def test_torch_func_transforms(backend, transform, name):
    """Each torch.func transform of our op equals the same transform of torch's."""
    # A batch of 6 samples, each an (N=4, C=5) call.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (6, 4), generator=gen)
    p = torch.rand(6, 4, 5, generator=gen, dtype=torch.float64).softmax(-1)
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    call = SAMPLE_CALLS[name]
    with use_backend(backend):
        ours = TRANSFORMS[transform](lambda *a: call(fusedce.functional, *a), x, t, p, w)
    try:
        theirs = TRANSFORMS[transform](lambda *a: call(F, *a), x, t, p, w)
    except RuntimeError as exc:
        # torch's smoothed, weighted mean uses masked_select, which vmap cannot batch; ours
        # batches, so compare it with torch one sample at a time.
        assert transform == "vmap" and "masked_select" in str(exc)
        theirs = torch.stack([call(F, x[i], t[i], p[i], w) for i in range(x.shape[0])])
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    x, t, p, w = _inputs((8, 5))
    x32, p32, w32 = x.detach().float().requires_grad_(), p.detach().float(), w.float()

    def step(x):
        return (fusedce.cross_entropy(x, t, weight=w32, ignore_index=2, label_smoothing=0.1)
                + fusedce.cross_entropy(x, p32, reduction="sum")
                + fusedce.nll_loss(fusedce.log_softmax(x, 1), t)
                + fusedce.softmax(x, 0).square().sum())

    def reference(x):
        return (F.cross_entropy(x, t, weight=w32, ignore_index=2, label_smoothing=0.1)
                + F.cross_entropy(x, p32, reduction="sum")
                + F.nll_loss(F.log_softmax(x, 1), t)
                + F.softmax(x, 0).square().sum())

    torch._dynamo.reset()
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
        out = compiled(x32)
        (grad,) = torch.autograd.grad(out, x32)
    expected = reference(x32)
    (expected_grad,) = torch.autograd.grad(expected, x32)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_opcheck():
    """The registered ops pass torch.library's consistency checks (schema, fake, autograd
    registration, and — where they exist — AOT dispatch)."""
    ops = torch.ops.fusedce
    x = torch.randn(4, 7, 3)
    t = torch.randint(0, 7, (4, 3))
    w = torch.rand(7)
    p = torch.rand(4, 7, 3)
    _loss, lse = ops.ce_forward(x, t, w, -100, 0.1)
    _, plse = ops.ce_prob_forward(x, p, w, 0.1)
    g = torch.rand(4, 3)
    x2, t1 = x[:, :, 0], t[:, 0]
    _, rlse, denominator = ops.ce_reduced_forward(x2, t1, -100, True)
    out = ops.log_softmax_forward(x)
    sm = ops.softmax_forward(x)
    samples = [
        (ops.ce_forward, (x, t, w, -100, 0.1)),
        (ops.ce_backward, (g, x, t, w, lse, -100, 0.1)),
        (ops.ce_backward_, (g, x.clone(), t, w, lse, -100, 0.1)),
        (ops.ce_prob_forward, (x, p, w, 0.1)),
        (ops.ce_prob_backward, (g, x, p, w, plse, 0.1)),
        (ops.ce_prob_backward_, (g, x.clone(), p, w, plse, 0.1)),
        (ops.ce_reduced_forward, (x2, t1, -100, True)),
        (ops.ce_reduced_backward, (torch.rand(()), x2, t1, rlse, denominator, -100)),
        (ops.nll_forward, (x, t, w, -100)),
        (ops.nll_backward, (g, t, w, -100, 7, torch.float32)),
        (ops.log_softmax_forward, (x,)),
        (ops.log_softmax_backward, (torch.randn_like(out), out)),
        (ops.softmax_forward, (x,)),
        (ops.softmax_backward, (torch.randn_like(sm), sm)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("name", CALLS)
def test_meta_tensors_give_torch_shapes_and_dtypes(name):
    """On the meta device the registered ops' fake kernels run, forward and backward."""
    x, t, p, w = (a.detach().to("meta") for a in _inputs())
    x.requires_grad_()
    args, fn = CALLS[name](x, t, p, w)
    ours = fn(*args)
    theirs = TORCH_CALLS[name](x, t, p, w)
    assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    assert grad.shape == x.shape and grad.is_meta
