"""The per-call overhead of the common loss, counted: every torch op and every fusedce op that one
forward plus backward of ``cross_entropy(x, target)`` dispatches on CPU.

A small loss is bound by these calls, not by its arithmetic (on a 256×10 input each op costs
about as much as the whole kernel), so an op added to the hot path is a slowdown that timings on
a shared machine would not catch. The counts are exact: a change that adds or removes one must
update them here, with its reason.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

import fusedce
from fusedce.kernels import available_backends, use_backend

from .helpers import OpRecorder

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ CPU backend is unavailable")


def _forward_and_backward(call) -> tuple[Counter[str], Counter[str]]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen, requires_grad=True)
    target = torch.randint(0, 10, (256,), generator=gen)
    target[::9] = -100
    call(x, target).backward()  # warm: the first call loads the extension
    x.grad = None
    with OpRecorder() as recorder:
        loss = call(x, target)
        forward = len(recorder.ops)
        loss.backward()
    return Counter(recorder.ops[:forward]), Counter(recorder.ops[forward:])


# Autograd's own ops around any custom Function's backward, which fusedce cannot avoid:
AUTOGRAD = Counter({
    "aten.ones_like": 1,  # loss.backward() seeds the scalar loss's gradient with ones
    "aten.detach": 1,  # AccumulateGrad stores x.grad as a detached tensor
})


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_call_is_one_op_each_way(reduction):
    """The plain (N, C) call with int64 targets: validation, the canonical views, the per-row loss,
    the sum, the count of non-ignored rows and the division all happen inside one fused op, and
    the backward is one fused op too (no zero-filled gradients for the non-differentiable lse and
    denominator outputs, no autograd nodes for views or the reduction)."""
    forward, backward = _forward_and_backward(
        lambda x, t: fusedce.cross_entropy(x, t, ignore_index=-100, reduction=reduction))
    assert forward == Counter({"fusedce.ce_reduced_forward": 1})
    assert backward == AUTOGRAD + Counter({"fusedce.ce_reduced_backward": 1})


def test_module_call_takes_the_same_path():
    """nn.Module users get the same two ops (CrossEntropyLoss forwards its arguments)."""
    module = fusedce.CrossEntropyLoss()
    forward, backward = _forward_and_backward(module)
    assert forward == Counter({"fusedce.ce_reduced_forward": 1})
    assert backward == AUTOGRAD + Counter({"fusedce.ce_reduced_backward": 1})


def test_general_path_op_count():
    """Any other call (here label smoothing) takes the general path. Its count guards that path's
    overhead too: the canonical views of x and target (2 views), the fused per-row forward, the
    'mean' (sum of the rows; ne and count_nonzero to count the non-ignored ones; eq,
    scalar_tensor, _to_copy and where to turn a zero denominator into NaN, as torch's smoothed
    mean does; div); in backward, div and expand for the mean's gradient, the fused backward, and
    the view back to x's shape (no zero gradient for the stats output: it is not materialised)."""
    forward, backward = _forward_and_backward(
        lambda x, t: fusedce.cross_entropy(x, t, label_smoothing=0.1))
    assert forward == Counter({
        "aten.view": 2, "fusedce.ce_forward": 1, "aten.sum": 1, "aten.ne": 1, "aten.count_nonzero": 1,
        "aten.eq": 1, "aten.scalar_tensor": 1, "aten._to_copy": 1, "aten.where": 1, "aten.div": 1,
    })
    assert backward == AUTOGRAD + Counter({
        "aten.div": 1, "aten.expand": 1, "fusedce.ce_backward": 1, "aten.view": 1,
    })


# ---- the triton backend (under the interpreter here; the same Python path runs on CUDA) -------

needs_triton = pytest.mark.skipif(
    "triton" not in available_backends("cpu"),
    reason="the triton backend runs on CPU tensors only under TRITON_INTERPRET=1",
)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_plain_call_is_one_op_each_way(reduction):
    """On the triton backend too, the plain call is the two fused ops (on CUDA tensors the same
    check takes this path: functional's fast path is for CPU and CUDA tensors)."""
    with use_backend("triton"):
        forward, backward = _forward_and_backward(
            lambda x, t: fusedce.cross_entropy(x, t, ignore_index=-100, reduction=reduction))
    assert forward == Counter({"fusedce.ce_reduced_forward": 1})
    assert backward == AUTOGRAD + Counter({"fusedce.ce_reduced_backward": 1})


@needs_triton
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_triton_fused_ops_run_one_kernel_and_allocate_only(mean):
    """Inside the two ops, the triton backend runs one kernel each way and no torch op but its
    output allocations (forward: the loss, the row stats, the denominator and the programs'
    partials; backward: the gradient). The interpreter's launch copies the arguments with torch
    ops of its own; they are not counted (a GPU launch has none). The composite it replaced ran
    the per-row kernel, a sum, ne, sum, _to_copy and div, and in backward _to_copy, div and expand.
    On the host the forward also reads the targets for torch's IndexError (CUDA skips it); its ops
    are counted apart."""
    from fusedce import _ops
    from fusedce.kernels import reference
    from fusedce.kernels.triton import reduced

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    target = torch.randint(0, 10, (256,), generator=gen)
    target[::9] = -100
    forward_op, backward_op = _ops._eager_kernel("ce_reduced_forward"), _ops._eager_kernel("ce_reduced_backward")
    launches: list[str] = []
    real_launch = reduced.launch

    def counting_launch(kernel, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(kernel.fn.__name__)
        with _disable_current_modes():  # the interpreter's own copies of the arguments
            real_launch(kernel, *args, **kwargs)

    with use_backend("triton"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(reduced, "launch", counting_launch)
        forward_op(x, target, -100, mean)  # warm: creates the ticket counter
        with OpRecorder() as host_check:
            reference.check_targets(target, 10, -100)
        with OpRecorder() as recorder:
            _, lse, denominator = forward_op(x, target, -100, mean)
        assert Counter(recorder.ops) == Counter({"aten.empty": 4}) + Counter(host_check.ops)
        grad_out = torch.ones((), dtype=x.dtype)
        with OpRecorder() as recorder:
            grad = backward_op(grad_out, x, target, lse, denominator, -100)
        assert Counter(recorder.ops) == Counter({"aten.empty": 1})
    assert launches == ["_ce_reduced_fwd_kernel"] * 2 + ["_ce_reduced_bwd_kernel"]
    assert grad.shape == x.shape
