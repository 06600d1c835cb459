"""The C++ backend's float32 <-> half-precision passes for the linear head's weight gradient
(src/fusedce/kernels/cpu/widen.cpp): bit for bit what ATen's conversions and add_ give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fusedce
from fusedce.kernels import _load
from fusedce.linear import chunked

pytestmark = pytest.mark.skipif(_load("cpu") is None, reason="the C++ CPU kernels are unavailable")

HALF = [torch.bfloat16, torch.float16]


def _specials(n: int) -> torch.Tensor:
    """Random float32 values with the edges of half-precision rounding: subnormals, ties,
    overflow, infinities, NaN, signed zeros."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * torch.logspace(-45, 38, n, base=2.0).clamp(max=3e38)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 65520.0,
                          1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 2.0**-24, 2.0**-25, 3.4e38])
    k = min(n, edges.numel())
    x[:k] = edges[:k]
    return x


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("n", [1, 31, 1000, 70001])
def test_narrowed_rounds_as_aten(dtype, n):
    x = _specials(n)
    ours = _load("cpu").narrowed(x, dtype)
    theirs = x.to(dtype)
    same = (ours.view(torch.int16) == theirs.view(torch.int16)) | (ours.isnan() & theirs.isnan())
    assert bool(same.all()), x[~same][:8]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("assign", [True, False])
def test_accumulate_widened_is_atens_widening_add(dtype, assign):
    gen = torch.Generator().manual_seed(1)
    block = (torch.randn(70001, generator=gen) * 100).to(dtype)
    acc = torch.randn(70001, generator=gen)
    expected = block.float() if assign else acc + block.float()
    _load("cpu").accumulate_widened_(acc, block, assign)
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_linear_heads_gradients_match_the_aten_path(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(700, 32, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(3000, 32, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, 3000, (700,), generator=gen)

    def grads():
        x.grad = w.grad = None
        fusedce.linear_cross_entropy(x, w, target, options=SimpleNamespace(batch_chunk_size=100)).backward()
        return x.grad.clone(), w.grad.clone()

    ours = grads()
    monkeypatch.setattr(chunked, "backend_for", lambda device: object())  # no C++ passes: ATen's
    theirs = grads()
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_max_row_abs_sum_is_the_largest_row_1_norm(dtype):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 77, generator=gen) * 10).to(dtype)
    expected = w.float().abs().sum(1).max().item()
    assert _load("cpu").max_row_abs_sum(w) == pytest.approx(expected, rel=1e-5)
    w[123, 5] = float("inf")
    assert _load("cpu").max_row_abs_sum(w) == float("inf")
    w[7, 0] = float("nan")  # NaN wins over inf, wherever it sits
    assert _load("cpu").max_row_abs_sum(w) != _load("cpu").max_row_abs_sum(w)
