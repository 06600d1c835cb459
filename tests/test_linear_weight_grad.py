"""A half-precision weight gradient is summed over the row blocks in float32, a slab of its rows
at a time (fusedce/linear/chunked.py, ``_Gradients._accumulate``): every slab and every block
must land once, in the right rows."""

import pytest
import torch

import fusedce
from fusedce.linear import chunked


def _weight_grad(x, w, t):
    loss = fusedce.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5))
    return torch.autograd.grad(loss, w)[0]


@pytest.mark.parametrize("slab_rows", [1, 3, 7], ids=lambda r: f"slab{r}")
def test_bf16_weight_gradient_over_blocks_and_slabs(monkeypatch, slab_rows):
    torch.manual_seed(0)
    rows, hidden, classes = 29, 16, 7
    x = torch.randn(rows, hidden).bfloat16().requires_grad_()
    w = torch.randn(classes, hidden).bfloat16().requires_grad_()
    t = torch.randint(0, classes, (rows,))
    t[::4] = -100
    whole = _weight_grad(x, w, t)  # one slab of all 7 rows (the default's 8 MB hold 131072 rows)
    monkeypatch.setattr(chunked, "_WIDEN_BYTES", slab_rows * hidden * 4)  # slab_rows rows per slab
    sliced = _weight_grad(x, w, t)
    assert sliced.dtype == torch.bfloat16
    # A slab's product sums the same terms per entry as the whole block's: the same values.
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
    # And the sum over the blocks is torch's (bf16: each block's product is rounded once).
    eager = torch.autograd.grad(torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w), t), w)[0]
    torch.testing.assert_close(sliced.float(), eager.float(), rtol=2**-6, atol=2**-6 * eager.abs().max().item())
