"""The nn.Module drop-ins behave like torch's classes (patch() is tested in test_patch.py)."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fusedce

PAIRS = [
    (fusedce.CrossEntropyLoss, nn.CrossEntropyLoss),
    (fusedce.NLLLoss, nn.NLLLoss),
    (fusedce.LogSoftmax, nn.LogSoftmax),
    (fusedce.Softmax, nn.Softmax),
]
LOSS_PAIRS = PAIRS[:2]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_is_a_subclass_with_the_same_repr(ours, theirs):
    kwargs = {"dim": 1} if "softmax" in theirs.__name__.lower() else {}
    module = ours(**kwargs)
    assert isinstance(module, theirs)
    assert repr(module) == repr(theirs(**kwargs))


@pytest.mark.parametrize(("ours", "theirs"), LOSS_PAIRS)
def test_weight_is_a_buffer_in_state_dict(ours, theirs):
    weight = torch.rand(5)
    module = ours(weight=weight)
    assert set(module.state_dict()) == set(theirs(weight=weight).state_dict()) == {"weight"}
    module.double()
    assert module.weight.dtype == torch.float64
    fresh = ours(weight=torch.zeros(5, dtype=torch.float64))
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh.weight, weight.double())


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_pickles_and_round_trips_through_torch_save(ours, theirs):
    kwargs = {"dim": 1} if "softmax" in theirs.__name__.lower() else {"weight": torch.rand(5)}
    module = ours(**kwargs)
    clone = pickle.loads(pickle.dumps(module))
    assert type(clone) is ours
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is ours


@pytest.mark.parametrize(("ours", "theirs"), LOSS_PAIRS)
@pytest.mark.parametrize("kwargs", [
    {}, {"reduction": "sum", "ignore_index": 1}, {"reduction": "none"}, {"size_average": False},
    {"reduce": False}, {"weight": torch.rand(5) + 0.1},
], ids=str)
def test_loss_modules_match_torch(ours, theirs, kwargs):
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        ours_module = ours(**kwargs)
    with warnings.catch_warnings(record=True) as theirs_warnings:
        warnings.simplefilter("always")
        theirs_module = theirs(**kwargs)
    # The legacy-argument warning comes once, from the constructor.
    assert [str(w.message) for w in ours_warnings] == [str(w.message) for w in theirs_warnings]
    inp = x if ours is fusedce.CrossEntropyLoss else F.log_softmax(x, 1)
    a, b = ours_module(inp, t), theirs_module(inp, t)
    torch.testing.assert_close(a, b)
    grad_ours = torch.autograd.grad(a.sum(), x, retain_graph=True)[0]
    torch.testing.assert_close(grad_ours, torch.autograd.grad(b.sum(), x)[0])


def test_cross_entropy_module_label_smoothing_and_probability_targets():
    x = torch.randn(6, 5, 3, requires_grad=True)
    p = torch.rand(6, 5, 3).softmax(1)
    for target in (torch.randint(0, 5, (6, 3)), p):
        a = fusedce.CrossEntropyLoss(label_smoothing=0.2)(x, target)
        torch.testing.assert_close(a, nn.CrossEntropyLoss(label_smoothing=0.2)(x, target))


def test_label_smoothing_is_validated_at_call_time_not_construction():
    module = fusedce.CrossEntropyLoss(label_smoothing=2.0)  # constructs, as torch's does
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0\. Got: 2"):
        module(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(("ours", "theirs"), PAIRS[2:])
def test_softmax_modules_implicit_dim_warning_points_at_the_same_file(ours, theirs):
    x = torch.randn(2, 3, 4)
    records = []
    for cls in (ours, theirs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cls()(x)
        records.append(([(str(w.message), w.filename) for w in caught], out))
    assert records[0][0] == records[1][0]
    assert records[0][0][0][1].endswith("module.py")  # torch attributes it to nn.Module's call
    torch.testing.assert_close(records[0][1], records[1][1])


def test_softmax_setstate_defaults_dim_like_torch():
    state = fusedce.Softmax(dim=1).__dict__.copy()
    del state["dim"]  # a module pickled by an old torch
    module = fusedce.Softmax.__new__(fusedce.Softmax)
    module.__setstate__(state)
    assert module.dim is None


def test_inplace_backward_is_in_the_repr_only_when_set():
    assert repr(fusedce.CrossEntropyLoss(inplace_backward=True)) == "CrossEntropyLoss(inplace_backward=True)"

