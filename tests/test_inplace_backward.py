"""inplace_backward=True: the gradient lands in the logits' own storage, or a clear error says why
it cannot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import use_backend
from fusedce.kernels import available_backends

BACKENDS = available_backends("cpu")


def _logits(shape=(8, 11), dtype=torch.float32, layout=None):
    torch.manual_seed(0)
    hidden = torch.randn(shape[0], 6, dtype=dtype, requires_grad=True)
    head = torch.randn(6, shape[1], dtype=dtype)
    logits = hidden @ head
    if layout == "class_last_4d":
        logits = logits.view(2, 4, 11, 1).permute(0, 2, 1, 3)  # (2, 11, 4, 1), classes innermost
    return hidden, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("layout", [None, "class_last_4d"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_is_written_into_the_logits(backend, target_kind, layout, reduction):
    hidden, logits = _logits(layout=layout)
    class_dim_size = logits.shape[1]
    rows_shape = (logits.shape[0], *logits.shape[2:])
    torch.manual_seed(1)
    target = (torch.randint(0, class_dim_size, rows_shape) if target_kind == "index"
              else torch.rand(logits.shape).softmax(1))
    captured = []
    logits.register_hook(captured.append)
    storage = logits.untyped_storage().data_ptr()
    with use_backend(backend):
        loss = fusedce.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1,
                                     inplace_backward=True)
        upstream = torch.rand_like(loss)
        (ours,) = torch.autograd.grad(loss, hidden, upstream)
    assert captured[0].untyped_storage().data_ptr() == storage
    hidden2, logits2 = _logits(layout=layout)
    expected = F.cross_entropy(logits2, target, reduction=reduction, label_smoothing=0.1)
    (theirs,) = torch.autograd.grad(expected, hidden2, upstream)
    torch.testing.assert_close(ours, theirs)


def test_a_second_backward_through_clobbered_logits_is_refused():
    _, logits = _logits()
    loss = fusedce.cross_entropy(logits, torch.randint(0, 11, (8,)), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_double_backward_is_refused():
    _, logits = _logits(dtype=torch.float64)
    loss = fusedce.cross_entropy(logits, torch.randint(0, 11, (8,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match=r"inplace_backward=True .* cannot be differentiated twice"):
        torch.autograd.grad(loss, logits, create_graph=True)


def test_expanded_logits_are_refused():
    logits = torch.randn(1, 5, requires_grad=True).expand(4, 5)
    with pytest.raises(ValueError, match="do not overlap in memory"):
        fusedce.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)


def test_logits_that_need_a_copy_are_refused():
    # (N, C, H, W) with H and W transposed: no (N, C, H*W) view exists.
    logits = torch.randn(2, 3, 4, 5).transpose(2, 3).requires_grad_()
    with pytest.raises(ValueError, match="without a copy"):
        fusedce.cross_entropy(logits, torch.zeros(2, 5, 4, dtype=torch.long), inplace_backward=True)


def test_a_promoting_probability_target_is_refused():
    logits = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"cannot write a torch\.float64 gradient"):
        fusedce.cross_entropy(logits, torch.rand(4, 5, dtype=torch.float64), inplace_backward=True)


def test_default_never_mutates_the_logits():
    _, logits = _logits()
    before = logits.detach().clone()
    fusedce.cross_entropy(logits, torch.randint(0, 11, (8,))).backward()
    assert torch.equal(logits.detach(), before)


def test_torch_compile_fullgraph_says_why_it_cannot_trace_it():
    _, logits = _logits()
    target = torch.randint(0, 11, (8,))
    compiled = torch.compile(lambda x: fusedce.cross_entropy(x, target, inplace_backward=True),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"inplace_backward=True cannot run inside torch\.compile"):
        compiled(logits)
