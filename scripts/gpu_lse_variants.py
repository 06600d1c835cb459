"""How fast can the forward's row statistics go? Variants of the online log-sum-exp, timed on the
lm-128k shape (16384 x 128256 bf16) against a device copy, each checked against float64.

* ``product``: fusedce's ``online_lse_step`` / ``finish_logsum`` (src/fusedce/kernels/triton/_common.py):
  per column block, a max, a tie count and a sum across the block's lanes;
* ``lanes``: each lane keeps its own running max and ``rest`` (the sum of its other terms) over the
  whole row, one exp per element (``exp(-|x - m|)`` is either the new term or the old total's
  rescale), and the lanes meet once per row at the end;
* ``classic``: the textbook online softmax (``s·exp(m - m') + Σ exp(x - m')``, ``log s``), which
  loses the digits of confident rows: the speed of the old kernels, for reference.

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_lse_variants.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from fusedce.kernels.triton._common import finish_logsum, log1p, online_lse_step

ROWS, CLASSES = 16384, 128256


@triton.jit
def _product_kernel(x_ptr, m_ptr, l_ptr, n_cols, stride, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = (cols < n_cols)[None, :]
        xf = tl.load(x_ptr + row * stride + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
        m, s = online_lse_step(m, s, xf, cmask)
    tl.store(m_ptr + row + tl.arange(0, 1), m)
    tl.store(l_ptr + row + tl.arange(0, 1), finish_logsum(m, s))


@triton.jit
def _row_block(x_ptr, row, stride, c0, n_cols, BLOCK_C: tl.constexpr):
    """Columns c0 .. c0+BLOCK_C of a row in float32, -inf past its end."""
    cols = c0 + tl.arange(0, BLOCK_C)
    return tl.load(x_ptr + row * stride + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)


@triton.jit
def _lanes_kernel(x_ptr, m_ptr, l_ptr, n_cols, stride, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        x = _row_block(x_ptr, row, stride, c0, n_cols, BLOCK_C)
        # One exp per element: exp(-|x - m|) is x's term when x <= m, else the old total's
        # rescale; a tie adds exactly exp(0) = 1. Both -inf: no term (not exp(nan)).
        e = tl.where((x == float("-inf")) & (m == float("-inf")), 0.0, tl.exp(-tl.abs(x - m)))
        s = tl.where(x > m, (1.0 + s) * e, s + e)
        m = tl.maximum(m, x)
    top = tl.max(m, axis=0)
    at_top = m == top
    ties = tl.sum(tl.where(at_top, 1.0, 0.0), axis=0)
    rest = tl.sum(tl.where(at_top, s, (1.0 + s) * tl.exp(m - top)), axis=0) + (ties - 1.0)
    logsum = tl.where(top == float("-inf"), float("nan"), log1p(tl.where(top == float("-inf"), 0.0, rest)))
    logsum = tl.where(top == float("inf"), float("nan"), logsum)
    tl.store(m_ptr + row, top)
    tl.store(l_ptr + row, logsum)


@triton.jit
def _classic_kernel(x_ptr, m_ptr, l_ptr, n_cols, stride, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        x = _row_block(x_ptr, row, stride, c0, n_cols, BLOCK_C)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - top), axis=0)
    tl.store(m_ptr + row, top)
    tl.store(l_ptr + row, tl.log(total))


KERNELS = {"product": _product_kernel, "lanes": _lanes_kernel, "classic": _classic_kernel}


def _run(name: str, x: torch.Tensor, block_c: int, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.empty(x.shape[0], device=x.device)
    logsum = torch.empty_like(m)
    KERNELS[name][(x.shape[0],)](x, m, logsum, x.shape[1], x.stride(0), BLOCK_C=block_c, num_warps=warps)
    return m, logsum


def _hostile(device: str) -> torch.Tensor:
    """Rows that tell the variants apart: a large common offset, ties, -inf masks, confident rows."""
    gen = torch.Generator(device=device).manual_seed(1)
    rows = torch.randn(8, 5000, device=device, generator=gen) * 2
    rows[0] += 3000.0  # a large offset
    rows[1] = 0.5  # every class tied
    rows[2, ::2] = float("-inf")  # half masked
    rows[3, 17] += 40.0  # confident: the rest is ~1e-17
    rows[4, 4000:] = float("-inf")
    rows[5, 3] = rows[5].max() + 0.0  # a tie at the max
    rows[6] = float("-inf")  # all masked
    rows[7, 123] = float("inf")
    return rows.bfloat16()


def _truth(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    m = x.max(1).values
    return m, torch.logsumexp(x - m[:, None], 1)


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    both_nan = got.isnan() & want.isnan()
    err = ((got.double() - want).abs() / want.abs().clamp_min(1e-300)).where(~both_nan, 0.0)
    return err.max().item()


def main() -> None:
    x = (torch.randn(ROWS, CLASSES, device="cuda") * 2).bfloat16()
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), return_mode="median")
    read_gbps = x.numel() * x.element_size() / 1e9
    print(f"copy {2 * read_gbps / copy_ms * 1e3:.0f} GB/s (read + write); one read of the logits at that speed: "
          f"{copy_ms / 2:.3f} ms")
    hostile = _hostile("cuda")
    truth_m, truth_l = _truth(hostile)
    print("variant | BLOCK_C | warps |    ms | % of copy speed | hostile rows: max rel err of logsum")
    configs = [("product", 4096, 8), ("product", 2048, 4), ("classic", 4096, 8)]
    configs += [("lanes", b, w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]
    for name, block_c, warps in configs:
        try:
            ms = do_bench(lambda n=name, b=block_c, w=warps: _run(n, x, b, w), return_mode="median")
            m, logsum = _run(name, hostile, block_c, warps)
            torch.cuda.synchronize()
            ok_m = torch.equal(m.double().nan_to_num(), truth_m.nan_to_num())
            err = _max_rel_err(logsum, truth_l)
            print(f"{name:<7} | {block_c:7d} | {warps:5d} | {ms:5.3f} | {copy_ms / 2 / ms * 100:15.0f} | "
                  f"{err:.2e}{'' if ok_m else ' (max differs)'}")
        except Exception as exc:  # report and go on
            print(f"{name:<7} | {block_c:7d} | {warps:5d} | failed: {type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
