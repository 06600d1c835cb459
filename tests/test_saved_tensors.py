"""Nothing of size N×C is saved for backward, beyond the input itself (and, for the softmax
family, its output, as torch does)."""

from __future__ import annotations

import pytest
import torch

import fusedce

N, C = 64, 1000


def _saved(fn, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return out, saved


INDEX = torch.randint(0, C, (N,))
PROB = torch.rand(N, C)
CASES = {
    "ce_index": lambda x: fusedce.cross_entropy(x, INDEX, label_smoothing=0.1, weight=torch.rand(C)),
    "ce_index_none": lambda x: fusedce.cross_entropy(x, INDEX, reduction="none"),
    "ce_prob": lambda x: fusedce.cross_entropy(x, PROB, label_smoothing=0.1),
    "nll": lambda x: fusedce.nll_loss(x, INDEX),
}


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", CASES)
def test_losses_save_only_the_input_and_per_row_values(name):
    x = torch.randn(N, C, requires_grad=True)
    _, saved = _saved(CASES[name], x)
    large = [t for t in saved if t.numel() >= N * C]
    for t in large:
        # The input, or the user's own probability target: views of tensors already alive.
        assert _same_storage(t, x) or _same_storage(t, PROB), f"saved a {tuple(t.shape)} {t.dtype} tensor"
    small = [t for t in saved if t.numel() < N * C]
    assert all(t.numel() <= max(N, C) for t in small)


@pytest.mark.parametrize("fn", [fusedce.log_softmax, fusedce.softmax])
def test_softmax_family_saves_its_output_only(fn):
    x = torch.randn(N, C, requires_grad=True)
    out, saved = _saved(lambda x: fn(x, 1), x)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
