"""Autograd corner cases where fusedce once differed from torch (issue 8), on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fusedce
from fusedce import use_backend
from fusedce.kernels import available_backends

BACKENDS = available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (3, 0)], ids=str)
def test_forward_ad_of_an_empty_probability_mean_is_nan_with_a_zero_tangent(backend, shape):
    """torch fills the empty sum with NaN instead of dividing 0 by 0, so only the value is NaN."""
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.rand(shape, dtype=torch.float64)
    results = []
    for fn in (F.cross_entropy, fusedce.cross_entropy):
        with use_backend(backend), fwAD.dual_level():
            out = fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.randn_like(x)), target))
            results.append((out.primal, out.tangent))
    (torch_value, torch_tangent), (value, tangent) = results
    assert torch_value.isnan() and value.isnan()
    assert tangent is not None and torch_tangent is not None
    assert tangent.item() == 0 == torch_tangent.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_double_backward_with_a_half_dtype_is_torchs_to_the_bit(backend, dtype, name):
    """Double backward of ``softmax(x32, dtype=float16)`` evaluates torch's derivative of the
    backward in the half dtype, as torch does. Rows of equal logits give an output that both
    round identically, so every second-order gradient must then be equal to the bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(6.0).repeat_interleave(8).view(6, 8).requires_grad_()
    upstream = torch.randn(6, 8, generator=gen).to(dtype).requires_grad_()
    second = torch.randn(6, 8, generator=gen)
    results = []
    for fn in (getattr(F, name), getattr(fusedce, name)):
        with use_backend(backend):
            y = fn(x, 1, dtype=dtype)
            (gx,) = torch.autograd.grad(y, x, upstream, create_graph=True)
            results.append((y, gx, *torch.autograd.grad(gx, (x, upstream), second)))
    for what, ours, theirs in zip(("output", "grad", "grad of grad wrt x", "grad of grad wrt upstream"),
                                  results[1], results[0], strict=True):
        assert ours.dtype == theirs.dtype, what
        assert torch.equal(ours, theirs), f"{what}: max diff {(ours.double() - theirs.double()).abs().max()}"
