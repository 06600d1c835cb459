"""The linear path's float32 CPU matmuls go through oneDNN (fusedce/linear/matmul.py): which
operands take that route, and that both routes give torch's results."""

import pytest
import torch

import fusedce
from fusedce.linear import matmul

needs_onednn = pytest.mark.skipif(not matmul._AVAILABLE, reason="torch built without oneDNN")


@needs_onednn
def test_only_nonempty_float32_cpu_operands_take_onednn():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert matmul.onednn(x, w)
    assert matmul.onednn(x, w.t().contiguous().t())  # a transposed-storage weight too
    assert not matmul.onednn(x.double(), w.double())
    assert not matmul.onednn(x.bfloat16(), w.bfloat16())  # mm already reaches oneDNN's bf16 kernels
    assert not matmul.onednn(x[:0], w)
    assert not matmul.onednn(x, w[:0])
    with torch.backends.mkldnn.flags(enabled=False):
        assert not matmul.onednn(x, w)


@needs_onednn
def test_linear_is_x_times_w_transposed_plus_b_for_any_weight_strides():
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 6), torch.randn(5, 6), torch.randn(5)
    expected = x.double() @ w.double().t() + b.double()
    for weight in (w, w.t().contiguous().t()):
        torch.testing.assert_close(matmul.linear(x, weight, b).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul.linear(x, w, None).double(), x.double() @ w.double().t(),
                               rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("ignored", [False, True], ids=["all-rows", "skipped-rows"])
def test_both_routes_give_the_same_loss_and_gradients(ignored):
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t = torch.randint(0, 11, (37,))
    if ignored:
        t[::3] = -100
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8)

    def run():
        loss = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, options=options)
        return (loss, *torch.autograd.grad(loss, (x, w, b)))

    through_onednn = run()
    with torch.backends.mkldnn.flags(enabled=False):
        through_mm = run()
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x.double(), w.double(), b.double()), t)
    expected = (reference, *torch.autograd.grad(reference, (x, w, b)))
    for ours, theirs, truth in zip(through_onednn, through_mm, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.double(), truth.double(), rtol=1e-5, atol=1e-6)
