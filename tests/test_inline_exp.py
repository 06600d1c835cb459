"""The CPU row path's inline exp (src/fusedce/kernels/cpu/common.h, ``exp_avx512``) against float64
exp, on every 61st float32 of [-104, 89]: the error bounds that common.h states, and the special
values (the forward's Σ exp(x - max) relies on exp(0) == 1, its padding on exp(-inf) == 0)."""

from __future__ import annotations

import math

import pytest
import torch

from fusedce.kernels import _load, cpu

pytestmark = pytest.mark.skipif(_load("cpu") is None or cpu.toolchain()["isa"] != "avx512",
                                reason="the inline exp is the AVX512 build's")


def _floats(lo: float, hi: float, step: int = 61) -> torch.Tensor:
    """Every ``step``-th float32 of [lo, hi] (lo <= 0 <= hi), by bit pattern."""
    def up_to(limit: float) -> torch.Tensor:
        top = torch.tensor([abs(limit)], dtype=torch.float32).view(torch.int32).item()
        return torch.arange(0, top + 1, step, dtype=torch.int32).view(torch.float32)
    return torch.cat([-up_to(lo).flip(0), up_to(hi)])


@pytest.fixture(scope="module")
def grid() -> tuple[torch.Tensor, torch.Tensor]:
    """The arguments whose exp is finite in float32, and their float64 exp."""
    x = _floats(-104.0, 89.0)
    truth = x.double().exp()
    finite = truth <= torch.finfo(torch.float32).max
    return x[finite], truth[finite]


@pytest.mark.parametrize("degree", [4, 6])
def test_overflow_is_inf(degree):
    x = _floats(0.0, 89.0)
    x = x[x.double().exp() > torch.finfo(torch.float32).max]
    assert x.numel() and (cpu.inline_exp(x, degree) == math.inf).all()


def _ulps(ours: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|ours - truth| in units of the float32 spacing at truth (subnormal spacing below tiny)."""
    info = torch.finfo(torch.float32)
    _, exponent = torch.frexp(truth.abs().clamp(min=info.tiny))
    spacing = torch.ldexp(torch.full_like(truth, info.eps), exponent - 1)
    return (ours.double() - truth).abs() / spacing


def test_degree_6_is_within_an_ulp_and_a_little(grid):
    """common.h's measured claim for the degree-6 form (Sleef's 1-ulp exp: 0.98 ulp)."""
    x, truth = grid
    worst = _ulps(cpu.inline_exp(x, 6), truth).max().item()
    assert worst <= 1.05, worst


def _degree_4_bound(largest_y: float) -> float:
    """common.h's relative error bound for the degree-4 exp where |y| = |x·log2(e)| <= largest_y:
    the fit's 2^-18.4, y's rounding (|y|·2^-24, times ln 2 in the result), and two roundings of
    2^-24 (the polynomial's last step, the scaling)."""
    return 2 ** -18.4 + largest_y * math.log(2) * 2 ** -24 + 2 * 2 ** -24


def test_degree_4_relative_error_where_results_are_normal(grid):
    x, truth = grid
    ours = cpu.inline_exp(x, 4).double()
    normal = truth >= torch.finfo(torch.float32).tiny
    relative = ((ours - truth).abs() / truth)[normal]
    assert relative.max().item() <= _degree_4_bound(126.0), math.log2(relative.max().item())
    # float16's results (2^-24 and up) need |x| <= 16.6, |y| <= 24, where y rounds finely.
    half = (x.abs() <= 16.6)[normal]
    assert relative[half].max().item() <= _degree_4_bound(24.0), math.log2(relative[half].max().item())
    # Below float32's normal range (|y| up to 150) the same bound, and the subnormal's rounding
    # (2^-149).
    beyond = ((ours - truth).abs() - 2 ** -149)[~normal] / truth[~normal]
    assert beyond.max().item() <= _degree_4_bound(150.0), math.log2(beyond.max().item())


@pytest.mark.parametrize("degree", [4, 6])
def test_special_values(degree):
    x = torch.tensor([0.0, -0.0, -math.inf, math.inf, math.nan, -200.0, 200.0, -1e30, 1e30])
    out = cpu.inline_exp(x, degree)
    assert out[:2].tolist() == [1.0, 1.0]
    assert out[2].item() == 0.0 and out[3].item() == math.inf and math.isnan(out[4].item())
    assert out[5].item() == 0.0 and out[6].item() == math.inf
    assert out[7].item() == 0.0 and out[8].item() == math.inf


def test_a_ragged_length_is_computed_whole():
    x = torch.linspace(-5, 0, 37)
    assert torch.allclose(cpu.inline_exp(x, 6), x.exp(), rtol=2e-7, atol=0)
