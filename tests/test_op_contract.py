"""What torch.compile bakes in about the registered ops must be true and versioned.

A compiled graph keeps each op's output sizes and strides as its fake kernel gives them: Inductor
asserts them after the call and restrides the saved activations of the backward to them. So the
fake must agree with every backend's real output, in shape, stride and dtype, on every layout;
and a change to the fakes must change the ops' names in the graph code, which is what Inductor's
on-disk FX graph cache keys on (a stale entry compiled against the old fakes otherwise fails to
compile the backward with "mismatch in length of strides and shape").
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fusedce import _ops, use_backend
from fusedce.kernels import available_backends
from fusedce.kernels.reference import accumulation_dtype

from .helpers import layouts, targets_with_ignored

BACKENDS = available_backends("cpu")
OPS = torch.ops.fusedce
SHAPES = [(3, 7, 2), (4, 5, 1)]
DTYPES = [torch.float32, torch.bfloat16]


def _calls(x: torch.Tensor) -> list[tuple[str, tuple]]:
    """One call of every out-of-place op on the (outer, C, inner) input ``x``; the backward ops
    take what their forward returned, as the autograd Functions pass it."""
    outer, classes, inner = x.shape
    acc = accumulation_dtype(x.dtype)
    target = targets_with_ignored((outer, classes, inner), -100)
    weight = torch.rand(classes, dtype=x.dtype)
    probs = torch.rand(outer, classes, inner, dtype=x.dtype).softmax(1)
    grad_rows = torch.rand(outer, inner, dtype=acc)
    _, stats = OPS.ce_forward(x, target, weight, -100, 0.1)
    _, prob_stats = OPS.ce_prob_forward(x, probs, weight, 0.1)
    x2, target1 = x[:, :, 0], target[:, 0]
    _, lse, denominator = OPS.ce_reduced_forward(x2, target1, -100, True)
    log_probs, probs_out = OPS.log_softmax_forward(x), OPS.softmax_forward(x)
    grad_out = torch.rand_like(x)
    return [
        ("ce_forward", (x, target, weight, -100, 0.1)),
        ("ce_backward", (grad_rows, x, target, weight, stats, -100, 0.1)),
        ("ce_prob_forward", (x, probs, weight, 0.1)),
        ("ce_prob_backward", (grad_rows, x, probs, weight, prob_stats, 0.1)),
        ("ce_reduced_forward", (x2, target1, -100, True)),
        ("ce_reduced_backward", (torch.rand((), dtype=x.dtype), x2, target1, lse, denominator, -100)),
        ("nll_forward", (x, target, weight, -100)),
        ("nll_backward", (grad_rows, target, weight, -100, classes, x.dtype)),
        ("log_softmax_forward", (x,)),
        ("log_softmax_backward", (grad_out, log_probs)),
        ("softmax_forward", (x,)),
        ("softmax_backward", (grad_out, probs_out)),
    ]


def _metadata(result: object) -> list[tuple]:
    results = result if isinstance(result, tuple) else (result,)
    return [(tuple(r.shape), r.stride(), r.dtype) for r in results]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fake_kernels_match_real_outputs(backend, dtype, shape):
    """Every op's fake gives the sizes, strides and dtypes of the backend's real outputs, on the
    contiguous, class-last and strided layouts."""
    mismatches = []
    with use_backend(backend):
        for layout, x in layouts(shape, dtype):
            for name, args in _calls(x):
                real = _metadata(getattr(OPS, name)(*args))
                with FakeTensorMode() as mode:
                    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                    fake = _metadata(getattr(OPS, name)(*fake_args))
                if real != fake:
                    mismatches.append(f"{name} on {layout}: real {real}, fake {fake}")
    assert not mismatches, "\n".join(mismatches)


def test_ops_are_defined_under_the_contract_version():
    """Each op has one overload, named by the hash of the fakes' and schemas' source, so that
    graph code (and Inductor's cache key) names the contract it was compiled against."""
    for name in _ops._SCHEMAS:
        assert getattr(OPS, name).overloads() == [_ops.CONTRACT], name
    assert _ops.contract_version(_ops._contract_sources()) == _ops.CONTRACT


def test_contract_version_follows_the_source():
    sources = _ops._contract_sources()
    assert len(sources) == 2 and all(sources)  # both modules' source was read, not the fallback
    changed = (sources[0].replace(b"(x.shape[0], x.shape[2], 2)", b"(x.shape[0], x.shape[2])"), sources[1])
    assert changed != sources
    assert _ops.contract_version(changed) != _ops.contract_version(sources)
    assert _ops.contract_version(sources) == _ops.contract_version(tuple(bytes(s) for s in sources))


def test_compiled_graph_names_the_contract(tmp_path, monkeypatch):
    """The code Inductor generates (and hashes for its cache) calls the versioned overload."""
    from torch._inductor.utils import run_and_get_code

    import fusedce

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    compiled = torch.compile(lambda x: fusedce.cross_entropy(x, target, label_smoothing=0.1), fullgraph=True)
    with use_backend("reference"):
        _, codes = run_and_get_code(compiled, x)
    torch._dynamo.reset()
    assert any(f"torch.ops.fusedce.ce_forward.{_ops.CONTRACT}(" in code for code in codes), codes
