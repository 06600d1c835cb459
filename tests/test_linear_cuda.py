"""fusedce.linear_cross_entropy on CUDA (cuBLAS matmuls, the Triton loss kernels), skipped without
a GPU.

The CPU suite checks the linear head on every backend against torch's own
``F.linear_cross_entropy``, which is new in torch 2.13; the GPU machine may run an older torch, so
the truth here is the reference definition ``cross_entropy(linear(x, W, b), target, ...)`` in
float64 on the same inputs, and the bar is the project's rule: fusedce's error against that truth
is no worse than torch eager's (``F.linear`` then ``F.cross_entropy``) in the same dtype on the
same GPU, up to a small factor for the different summation order of blocked matmuls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fusedce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fusedce's blocked matmuls sum the weight gradient's rows in another order than one large
# cuBLAS product, so an element's rounding differs; twice torch's own error, plus a floor of a
# few ulps of the result's dtype, covers that without hiding a wrong formula (which is off by
# O(1) relative).
FACTOR = 2.0
FLOOR_ULPS = 4.0
NAMES = ("loss", "grad x", "grad W", "grad b")


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    diff = (a.double() - truth).norm().item()
    return diff / max(truth.norm().item(), 1e-300)


def _run(
    fn: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, kwargs: dict[str, Any]
) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    loss = fn(*leaves[:2], target, leaves[2] if b is not None else None, **kwargs)
    upstream = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, upstream)
    return [loss.detach(), *grads]


def _fusedce(x, w, target, b, **kwargs):
    return fusedce.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)


def _eager(x, w, target, b, **kwargs):
    return F.cross_entropy(F.linear(x, w, b), target, **kwargs)


CASES = [
    ("plain mean", {}),
    ("sum, ignored rows", {"reduction": "sum", "ignore_index": 3}),
    ("none, weight", {"reduction": "none", "weight": True}),
    ("smoothing, weight", {"label_smoothing": 0.1, "weight": True}),
    ("probability target", {"prob": True}),
    ("bias", {"bias": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "case"), CASES, ids=[c[0] for c in CASES])
def test_linear_cross_entropy_on_cuda(dtype, name, case):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, hidden, classes = 300, 64, 1000  # rows not a multiple of the block; C not of 16
    x = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(classes, hidden, device="cuda", generator=gen) / hidden**0.5).to(dtype)
    b = torch.randn(classes, device="cuda", generator=gen).to(dtype) if case.get("bias") else None
    kwargs: dict[str, Any] = {k: v for k, v in case.items() if k not in ("bias", "prob", "weight")}
    if case.get("weight"):
        kwargs["weight"] = torch.rand(classes, device="cuda", generator=gen).to(dtype)
    if case.get("prob"):
        target = torch.softmax(torch.randn(rows, classes, device="cuda", generator=gen), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
        target[::7] = kwargs.get("ignore_index", -100)
    wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    truth = _run(
        _eager,
        x.double(),
        w.double(),
        None if b is None else b.double(),
        target.double() if case.get("prob") else target,
        wide,
    )
    ours = _run(_fusedce, x, w, b, target, kwargs)
    torchs = _run(_eager, x, w, b, target, kwargs)
    eps = torch.finfo(dtype).eps
    for what, o, t, ref in zip(NAMES[: len(ours)], ours, torchs, truth, strict=True):
        assert o.dtype == t.dtype and o.shape == t.shape, what
        assert torch.isfinite(o).all(), f"{name} {dtype} {what}: non-finite"
        ours_err, torch_err = _rel(o, ref), _rel(t, ref)
        assert ours_err <= FACTOR * torch_err + FLOOR_ULPS * eps, (
            f"{name} {dtype} {what}: fusedce {ours_err:.3g} vs torch {torch_err:.3g} against float64"
        )


def _peak_extra(step: Any) -> int:
    """The most memory in use during ``step()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_llama3_head_bf16_in_blocks_with_less_memory_than_eager():
    """A Llama-3 sized vocabulary in several row blocks: the loss and gradients agree with eager,
    and the peak memory beyond the inputs is under half of eager's."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows, hidden, classes = 2048, 512, 128256
    x = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(classes, hidden, device="cuda", generator=gen) / hidden**0.5).bfloat16().requires_grad_()
    target = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
    found: dict[str, Any] = {}

    def ours() -> None:
        found["ours"] = fusedce.linear_cross_entropy(x, w, target)
        found["ours"].backward()

    def eager() -> None:
        found["eager"] = F.cross_entropy(F.linear(x, w), target)
        found["eager"].backward()

    ours_peak = _peak_extra(ours)
    grads = (x.grad, w.grad)
    x.grad = w.grad = None
    eager_peak = _peak_extra(eager)
    assert ours_peak < 0.5 * eager_peak, f"peak extra {ours_peak / 2**20:.0f} MiB vs eager {eager_peak / 2**20:.0f}"
    assert abs(found["ours"].item() - found["eager"].item()) <= 1e-2 * abs(found["eager"].item())
    for what, o, t in zip(("grad x", "grad W"), grads, (x.grad, w.grad), strict=True):
        assert _rel(o, t.double()) < 2e-2, what
