"""The CPU kernels' output pool (src/fusedce/kernels/cpu/output_pool.h): a gradient that nobody
holds any more is reused by the next call of its size, one that anybody still holds (itself, a
view of it, its storage) never is, and ``fusedce.empty_cache`` lets the kept ones go."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.kernels import _load, use_backend

pytestmark = pytest.mark.skipif(_load("cpu") is None, reason="the C++ CPU kernels are unavailable")

SHAPE = (4, 21, 64, 64)  # a 1.4 MB float32 gradient: inside the pool's 1-64 MiB range


def _uses(t: torch.Tensor) -> int:
    """How many references the tensor's storage has (the Python storage object asked adds one)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _gradient(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    with use_backend("cpu"):
        fusedce.cross_entropy(x, target).backward()
    assert x.grad is not None
    return x.grad


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    target = torch.randint(0, SHAPE[1], (SHAPE[0], *SHAPE[2:]), generator=gen)
    fusedce.empty_cache()
    yield x, target
    fusedce.empty_cache()


def test_a_dropped_gradient_is_reused_with_the_right_values(inputs):
    x, target = inputs
    first = _gradient(x, target)
    address = first.data_ptr()
    del first
    second = _gradient(x * 2, target)
    assert second.data_ptr() == address
    fresh = torch.func.grad(lambda t: torch.nn.functional.cross_entropy(t, target))(x * 2)
    torch.testing.assert_close(second, fresh)


@pytest.mark.parametrize("keep", ["tensor", "view", "storage"])
def test_a_gradient_still_held_is_never_reused(inputs, keep):
    x, target = inputs
    first = _gradient(x, target)
    expected = first.clone()
    held = {"tensor": first, "view": first[1:, 3], "storage": first.untyped_storage()}[keep]
    del first
    second = _gradient(x * 3, target)
    assert second.untyped_storage().data_ptr() != expected.data_ptr()
    kept = held if keep != "storage" else torch.empty(0).set_(held).view(SHAPE)
    torch.testing.assert_close(kept, expected if keep != "view" else expected[1:, 3], rtol=0, atol=0)


def test_empty_cache_drops_the_pools_reference(inputs):
    x, target = inputs
    grad = _gradient(x, target)
    pooled = _uses(grad)
    fusedce.empty_cache()
    assert _uses(grad) == pooled - 1


def test_small_outputs_are_not_kept(inputs):
    _, _ = inputs
    small = _gradient(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    alone = torch.empty(8, 10)
    assert _uses(small) == _uses(alone)


def test_large_outputs_are_reused_and_kept_two_at_most(inputs):
    """Above 64 MiB (an LM's gradient) the pool keeps the two most recent (up to 1 GiB in all)."""
    _, _ = inputs
    target = torch.zeros(1024, dtype=torch.long)
    first = _gradient(torch.zeros(1024, 16500), target)  # a 68 MB float32 gradient
    address = first.data_ptr()
    del first
    # Reused before _uses is asked: a storage's Python object, once made, stays with it and holds
    # a reference, so that the pool never hands that storage out again.
    again = _gradient(torch.ones(1024, 16500), target)
    assert again.data_ptr() == address
    torch.testing.assert_close(again[0, :2], torch.tensor([1 / 16500 - 1, 1 / 16500]) / 1024)
    del again
    grads = [_gradient(torch.zeros(1024, c), target) for c in (16400, 16600, 16700)]
    alone = torch.empty(8, 10)
    # The first was evicted when the third came: only its tensor refers to it now.
    assert [_uses(g) - _uses(alone) for g in grads] == [0, 1, 1]


def test_an_output_above_the_large_bound_is_never_kept(inputs):
    """A one-off output above 1 GiB is not hoarded, and evicts nothing to make room."""
    _, _ = inputs
    target = torch.zeros(1024, dtype=torch.long)
    kept = _gradient(torch.zeros(1024, 16500), target)
    huge = _gradient(torch.zeros(1024, 262200), target)  # a 1.07 GB float32 gradient
    alone = torch.empty(8, 10)
    assert _uses(huge) == _uses(alone)
    assert _uses(kept) == _uses(alone) + 1


def test_the_linear_heads_scratch_and_gradients_are_pooled():
    """The linear head's block scratch comes from the pool: once dropped, the next request of its
    size gets its storage back (never while held); its bf16 weight gradient is pooled too."""
    from fusedce.linear.chunked import scratch

    fusedce.empty_cache()
    like = torch.empty(1)
    with use_backend("cpu"):
        block = scratch((1024, 512), torch.bfloat16, like)  # 1 MiB
        held = scratch((1024, 512), torch.bfloat16, like)
        assert held.data_ptr() != block.data_ptr()
        where = block.data_ptr()
        del block
        assert scratch((1024, 512), torch.bfloat16, like).data_ptr() == where

        x = torch.randn(64, 64).bfloat16().requires_grad_()
        w = torch.randn(8192, 64).bfloat16().requires_grad_()  # a 1 MiB gradient
        fusedce.linear_cross_entropy(x, w, torch.randint(0, 8192, (64,))).backward()
    assert w.grad is not None
    assert _uses(w.grad) == _uses(torch.empty(8, 10)) + 1  # the pool's reference
