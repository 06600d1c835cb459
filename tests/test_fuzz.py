"""A property-based fuzz of every op and backend against torch (issue 8).

Each example is a ``Spec`` (see ``fuzz_spec``): an op, a shape up to 5-D with C up to 70k and
N = 0, a layout, a dtype, hostile values (magnitudes 1e-3..1e4, large common offsets, -inf masks,
NaN), a target of any dtype torch accepts with a colliding or out-of-range ignore_index, weights
with zeros, a reduction and label smoothing. Values, gradients, dtypes, warnings and exceptions
must match torch under the rule in ``fuzz_compare``.

The default run is deterministic (``derandomize``, no example database) and short: 360
examples, under a minute when nothing fails. ``--fuzz-examples N`` runs N random examples per
backend and op family instead (``--hypothesis-seed S`` pins them), e.g.

    python -m pytest tests/test_fuzz.py --fuzz-examples 5000 -k "reference or cpu"

A failure prints the spec (the whole reproducer, see ``fuzz_spec``), a one-line ``reproduce:``
call, and hypothesis' ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fusedce.kernels import available_backends

from .fuzz_compare import differences
from .fuzz_spec import LOSS_OPS, MAX_ELEMENTS, SOFTMAX_OPS, Spec, specs

BACKENDS = available_backends("cpu")
# Examples per backend and op family in the default run; the Triton interpreter is slow.
DEFAULT_EXAMPLES = {"reference": 80, "cpu": 80, "triton": 20}


def _settings(request: pytest.FixtureRequest, backend: str) -> settings:
    examples = request.config.getoption("--fuzz-examples")
    common = {"deadline": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
    if examples:
        return settings(max_examples=examples, **common)
    # Deterministic in CI: the same examples on every run, no example database.
    return settings(max_examples=DEFAULT_EXAMPLES.get(backend, 20), derandomize=True, database=None, **common)


def _fuzz(request: pytest.FixtureRequest, backend: str, ops: tuple[str, ...]) -> None:
    @_settings(request, backend)
    @given(spec=specs(ops))
    def check(spec: Spec) -> None:
        problems = differences(spec, backend)
        assert not problems, (
            f"fusedce ({backend}) differs from torch:\n  " + "\n  ".join(problems)
            + f"\nreproduce: from tests.fuzz_compare import differences; "
            f"from tests.fuzz_spec import Spec; import torch; differences({spec!r}, {backend!r})"
        )

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_match_torch(request, backend):
    _fuzz(request, backend, LOSS_OPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_family_matches_torch(request, backend):
    _fuzz(request, backend, SOFTMAX_OPS)


# Examples the long runs found, each fixed at its root (and kept here so it stays fixed):
# label smoothing 1 over near-uniform probabilities and confident rows (the logits' gradient is a
# difference of much larger terms: fuzz_compare's T), a float64 log_softmax and softmax gradient
# summed in another order than torch's, a confident float64 loss (torch rounds its log-sum at the
# ulp of 1), float16 softmax of bfloat16 input (the output's rounding, magnified), a uint8 target
# on K-dimensional rows with no classes (torch raises its Long/Byte error), and a float16
# log-probability below -65504 that torch's 0·inf turns into a NaN target gradient; and below.
CONFIDENT_33002 = Spec("cross_entropy", (33002,), torch.float64, 0, target="confident", target_dtype=torch.float64)

FOUND = [
    Spec("cross_entropy", (3,), torch.float32, 0, magnitude=0.01, offset=-3000.0, label_smoothing=1.0),
    Spec("cross_entropy", (2,), torch.float32, 1, magnitude=0.01, label_smoothing=1.0),
    Spec("log_softmax", (6282,), torch.float64, 0, magnitude=10.0, dim=0),
    Spec("softmax", (20,), torch.float64, 0, magnitude=100.0, dim=0),
    Spec("cross_entropy", (2, 8, 4), torch.float64, 932, layout="transposed", magnitude=1e4, offset=1e6,
         target="confident", target_dtype=torch.float64, weight="some_zero", reduction="none"),
    Spec("cross_entropy", (1, 343, 1, 1, 7), torch.float32, 18457, layout="expanded", target="confident",
         target_dtype=torch.float32, ignore_index=-1, reduction="mean", label_smoothing=0.0),
    Spec("softmax", (3, 2657, 5, 3), torch.bfloat16, 2822053, layout="channels_last", magnitude=100.0,
         offset=600.0, dim=-3, softmax_dtype=torch.float16),
    Spec("cross_entropy", (2467,), torch.float64, 0, offset=60000.0, target="confident",
         target_dtype=torch.float64, weight="positive", reduction="mean"),
    Spec("cross_entropy", (2, 0, 2, 3), torch.float16, 13703, magnitude=1e4, neg_inf="scattered",
         target_dtype=torch.uint8, ignore_index=156, weight="positive"),
    Spec("nll_loss", (3, 0, 1, 3), torch.float16, 60979294, layout="channels_last", magnitude=0.1, neg_inf="rows",
         target_dtype=torch.uint8, ignore_index=255, weight="positive", reduction="mean"),
    Spec("cross_entropy", (1476,), torch.float16, 265201, layout="sliced", magnitude=1e4, target="prob",
         target_dtype=torch.float16, ignore_index=-1, weight="some_zero", label_smoothing=1.0),
    # torch's float64 kernels for a class dim that is not last, 170 ulp off (fuzz_compare._class_last)
    Spec("softmax", (24057, 2), torch.float32, 0, magnitude=10.0, nan=True, dim=0, softmax_dtype=torch.float64),
    Spec("cross_entropy", (1, 1038, 3), torch.float64, 0, nan=True, target="confident", target_dtype=torch.float64),
    # a uint8 target out of range under 'none': torch prints the raw byte (README)
    Spec("cross_entropy", (1, 0), torch.float32, 0, nan=True, target_dtype=torch.uint8, reduction="none"),
    # torch's smoothing term compares a uint8 target with ignore_index in uint8 (256 wraps to 0)
    Spec("cross_entropy", (2, 2), torch.float32, 0, nan=True, target_dtype=torch.uint8, ignore_index=256,
         label_smoothing=1.0),
    # an out-of-range uint8 target under a weighted, smoothed 'mean': torch's IndexError comes first
    Spec("cross_entropy", (0,), torch.float32, 0, nan=True, target_dtype=torch.uint8, weight="positive",
         label_smoothing=1.0),
    # ... and with that target ignored, torch's gather sees no index and the 'mean' is NaN
    Spec("cross_entropy", (0,), torch.float32, 0, nan=True, target_dtype=torch.uint8, ignore_index=0,
         weight="positive", label_smoothing=1.0),
    # a loss of 4e-18 (logits 40 apart) that the float64 truth rounds to 0; torch's float16 NaN
    # (inf - inf) where the truth and fusedce are +inf
    Spec("cross_entropy", (10,), torch.float32, 1, magnitude=1000.0),
    Spec("nll_loss", (3, 1, 3), torch.float16, 0, offset=30000.0, neg_inf="scattered", nan=True),
    Spec("cross_entropy", (41,), torch.float16, 0, magnitude=1e4, target="prob", target_dtype=torch.float16),
    # a float16 target gradient whose truth (65530.5) rounds to inf: ours inf, torch's float16
    # log-probability times the upstream 65504
    Spec("cross_entropy", (2, 3001), torch.float16, 0, magnitude=1e4, nan=True, target="prob",
         target_dtype=torch.float16, reduction="sum"),
    # the uint8 smoothing path (ignore_index -100 wraps to 156) on a row whose target is at -inf:
    # torch's loss is inf (an ε = 1 kernel pass gave 0·inf = NaN)
    Spec("cross_entropy", (3, 3), torch.float32, 0, neg_inf="scattered", nan=True, target_dtype=torch.uint8,
         reduction="none", label_smoothing=0.5),
    # logits 94 apart in float32: the target class's gradient is -1.2e-41 (p_t - 1 from expm1),
    # the other class's a subnormal p (the row path's exp, not exp_u20, in the small-C tile path)
    Spec("cross_entropy", (2,), torch.float32, 7, magnitude=100.0),
    # ... and with label smoothing 1 the expm1 form cancels pc against (ε/C)·W: only for p_t > 1/2
    Spec("cross_entropy", (105,), torch.float32, 0, magnitude=0.1, label_smoothing=1.0),
    # a confident float64 row: torch's log p_t = -1.29e-8 is 1e-8 relatively off (it rounds
    # 1 + rest), fusedce's log1p exact; the target's gradient earns the value's allowance
    Spec("cross_entropy", (2,), torch.float64, 0, target="confident", target_dtype=torch.float64,
         weight="some_zero"),
    # softmax(dtype=float64) of float32 logits: the float32 input gradient is rounded from float64,
    # by torch and by fusedce, an ulp of float32 apart at a rounding boundary
    Spec("softmax", (2, 5409, 3, 3), torch.float32, 339616, offset=60000.0, nan=True, dim=1,
         softmax_dtype=torch.float64),
    # a loss of 3e-39 next to an ignored NaN row; torch's float64 log-sum over 16821 classes
    Spec("cross_entropy", (2, 2), torch.float32, 2, magnitude=100.0, nan=True),
    Spec("cross_entropy", (3, 7045), torch.float64, 3, nan=True, target="confident", target_dtype=torch.float64),
    Spec("cross_entropy", (2, 16821), torch.float64, 0, nan=True, target="confident", target_dtype=torch.float64),
    # float64, 33002 classes, a confident probability target: torch's own hot-class gradient is
    # 2.5e-13 from the exact value, fusedce's 4e-14 (judged exactly, fuzz_compare)
    CONFIDENT_33002,
    # float64, 11948 classes, a NaN row beside a finite one whose gradient differs from torch's by
    # the order of its sums: judged exactly only once rows holding NaN were left out (seed 31)
    Spec("cross_entropy", (2, 11948), torch.float64, 0, nan=True, target="confident", target_dtype=torch.float64),
    # the same rows without the NaN: torch's hot-class gradient 2.12e-14 from the exact value,
    # fusedce's 2.15e-14 on the other side (the re-judge grants the rule's margin, fuzz_compare)
    Spec("cross_entropy", (2, 11948), torch.float64, 0, target="confident", target_dtype=torch.float64),
    Spec("cross_entropy", (2, 11948), torch.float64, 0, neg_inf="scattered", nan=True, target="confident",
         target_dtype=torch.float64),  # and with -inf logits, whose terms the exact sums take as 0
    # a float32 softmax over 65535 classes: each lane's plain sum of 4096 exps was 14x torch's error
    Spec("softmax", (2, 65535, 1), torch.float64, 201522897, magnitude=0.1, offset=60000.0, nan=True, dim=1,
         softmax_dtype=torch.float32),
    # a uint8 target with label smoothing (torch masks its smoothing term where the target is
    # ignore_index % 256): that term's log_softmax over dim 1 of (outer, C, inner) took torch's
    # strided kernel, 4e-6 off in float32 (seed 7)
    Spec("cross_entropy", (2, 503), torch.float32, 0, nan=True, target_dtype=torch.uint8, label_smoothing=1.0),
    # the same path, unbatched: its two terms' gradients, summed, from separately computed
    # log-probabilities, were 9.6e-6 off at the hot class where torch was 2.8e-6 (seed 7)
    Spec("cross_entropy", (35508,), torch.float32, 0, magnitude=10.0, target_dtype=torch.uint8,
         label_smoothing=0.75),
]


@pytest.mark.parametrize("spec", FOUND, ids=lambda s: f"{s.op}-{'x'.join(map(str, s.shape))}-{s.dtype}"[:60])
@pytest.mark.parametrize("backend", BACKENDS)
def test_what_the_long_fuzz_found(backend, spec):
    numel = 1
    for size in spec.shape:
        numel *= size
    if backend == "triton" and numel > 20000:
        pytest.skip("slow under the Triton interpreter")
    assert differences(spec, backend) == []


@given(spec=specs())
@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_specs_stay_within_the_element_budget(spec):
    """The default run stays fast: no draw exceeds the element budget."""
    numel = 1
    for size in spec.shape:
        numel *= size
    assert numel <= MAX_ELEMENTS


def test_the_fuzz_rule_can_fail():
    """The comparison is not vacuous: a candidate that loses the low digits of a shifted
    log_softmax (lse formed before the subtraction) is caught."""
    import torch

    from .fuzz_compare import compare_tensor

    x = torch.randn(4, 1000, dtype=torch.float64) + 60000
    lse = x.logsumexp(1, keepdim=True)
    truth = x - lse
    x32 = x.float()
    theirs = torch.log_softmax(x32, 1)
    ours = x32 - x32.double().logsumexp(1, keepdim=True).float()
    assert compare_tensor("value", theirs, theirs, truth, torch.float32) is None
    assert compare_tensor("value", ours, theirs, torch.log_softmax(x32.double(), 1), torch.float32) is not None



def test_the_exact_rejudge_still_catches_a_worse_gradient():
    """The float64 re-judge against the exact gradient (fuzz_compare) passes fusedce's result on
    the case it was made for, and fails it with its hot class moved to torch's side of the exact
    value, farther than torch (whose own error there is 2.5e-13)."""
    from fusedce import functional, use_backend

    from .fuzz_compare import _exactly_no_worse_than_torch, run
    from .fuzz_spec import build

    spec = CONFIDENT_33002
    with use_backend("reference"):
        ours = run(functional.cross_entropy, spec, build(spec)).grads[0]
    theirs = run(torch.nn.functional.cross_entropy, spec, build(spec)).grads[0]
    assert _exactly_no_worse_than_torch(spec, ours, theirs)
    # Mirror ours about torch at the hot class: 5.4e-13 from the exact value, beyond torch's error.
    worse = ours.clone()
    hot = int((ours - theirs).abs().argmax())
    worse[hot] = 2 * theirs[hot] - ours[hot]
    assert not _exactly_no_worse_than_torch(spec, worse, theirs)
