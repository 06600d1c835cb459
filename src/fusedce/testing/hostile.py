"""Hostile values: inputs that real training produces and that an implementation gets wrong
while passing the ordinary grid (issue 8).

* a large common offset on every logit (log-softmax is shift-invariant, so the exact answer does
  not change, but ``x - lse`` with ``lse = max + log Σ`` rounded first loses the low digits);
* ``-inf`` masks, whole masked rows included, and NaN logits, over more than one column block;
* uint8 targets whose ignore_index lies outside 0..255: torch compares targets as int64, so the
  default -100 does NOT ignore a target of 156 (-100 mod 256), nor 368 one of 112; and uint8
  targets on an empty K-dimensional batch;
* tiny losses: a near-one-hot probability target on a confident logit (a loss of about 1e-5),
  where ``lse·Σt - Σ t·x`` cancels to nothing, and where ``log Σ exp(x - max)`` is the log of a
  sum just above 1: ``log(1 + rest)`` rounds the sum at the ulp of 1 and keeps few of the loss's
  digits (torch does), ``log1p(rest)`` keeps them all.

Each is a ``Case`` with a ``special`` recipe, registered in ``grid.SPECIALS`` on import, and
``hostile_cases`` lists them for ``grid.default_grid``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor

from .grid import DTYPES, LOSS_OPS, SOFTMAX_OPS, SPECIALS, Case, Inputs, seed_of

# The ops these recipes build inputs for (linear_cross_entropy's grid is linear_grid's).
HOSTILE_OPS = LOSS_OPS + SOFTMAX_OPS

# A common offset per dtype: large, and still leaving the logits a resolution of at most 1/8.
OFFSETS = {torch.float64: 1e6, torch.float32: 6e4, torch.bfloat16: 500.0, torch.float16: 600.0}


def _modified_input(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> None:
    with torch.no_grad():
        inputs.input = fn(inputs.input.detach().double()).to(inputs.input.dtype)


def _common_offset(case: Case, inputs: Inputs) -> None:
    _modified_input(inputs, lambda x: x + OFFSETS[case.dtype])


def _neg_inf_mask(case: Case, inputs: Inputs) -> None:
    """About a quarter of the logits -inf, and the first and last rows entirely -inf."""

    def mask(x: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(seed_of(case) + 2)
        # drawn on the CPU (the same mask on every device), then moved to the case's device
        masked = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(x.device) < 0.25
        x = torch.where(masked, -math.inf, x)
        rows = x.movedim(case.class_dim, -1)
        rows[(0,) * (x.dim() - 1)] = -math.inf
        rows[(-1,) * (x.dim() - 1)] = -math.inf
        return x

    _modified_input(inputs, mask)


def _nan_logits(case: Case, inputs: Inputs) -> None:
    """A NaN in the first row and one in the last: their whole results are NaN, the rows in
    between must stay untouched."""

    def poke(x: Tensor) -> Tensor:
        rows = x.movedim(case.class_dim, -1)  # a view, classes last
        rows[(0,) * (x.dim() - 1)][min(3, rows.shape[-1] - 1)] = math.nan
        rows[(-1,) * x.dim()] = math.nan
        return x

    _modified_input(inputs, poke)


def _uint8_wrapping_target(case: Case, inputs: Inputs) -> None:
    """A uint8 target where every third row holds ignore_index mod 256: a real class, which
    torch does not ignore."""
    ignore = -100 if case.ignore_index is None else case.ignore_index
    classes = case.shape[case.class_dim]
    target = inputs.target.detach().clamp(0, min(classes, 256) - 1).to(torch.uint8)
    if target.dim():
        target.view(-1)[::3] = ignore % 256
    else:
        target.fill_(ignore % 256)
    inputs.target = target


def _uint8_empty_batch(case: Case, inputs: Inputs) -> None:
    """An empty batch of K-dimensional input with a uint8 target: torch's 'mean' and 'sum'
    accept it (NaN and 0); only 'none' raises."""
    inputs.input = inputs.input.detach()[:0]
    inputs.target = inputs.target.detach()[:0].clamp(min=0).to(torch.uint8)


def _confident_prob_target(case: Case, inputs: Inputs) -> None:
    """A near-one-hot probability target whose class has a logit 20 above the others: a loss of
    about 1e-5, made of ``log Σ exp(x - max)`` (about ``C·e^-20``) and the other classes' small
    target terms."""
    dim = case.class_dim
    classes = case.shape[dim]
    hot = (torch.arange(classes).view([-1] + [1] * (len(case.shape) - dim - 1)) == seed_of(case) % classes)
    hot = hot.double().expand(case.shape).to(inputs.input.device)
    _modified_input(inputs, lambda x: x + 20 * hot)
    inputs.target = (hot * (1 - 1e-6) + 1e-6 / classes).to(inputs.target.dtype)


HOSTILE_SPECIALS: dict[str, Callable[[Case, Inputs], None]] = {
    "common_offset": _common_offset,
    "neg_inf_mask": _neg_inf_mask,
    "nan_logits": _nan_logits,
    "uint8_wrapping_target": _uint8_wrapping_target,
    "uint8_empty_batch": _uint8_empty_batch,
    "confident_prob_target": _confident_prob_target,
}
SPECIALS.update(HOSTILE_SPECIALS)

# One row spanning several kernel column blocks, and K-dimensional rows.
_SHAPES: tuple[tuple[int, ...], ...] = ((3, 2500), (2, 5, 3, 4))


def _value_specials(dtype: torch.dtype) -> tuple[str, ...]:
    # The half types accumulate in float32, where their offsets are harmless: one dtype's worth
    # of offset cases is enough there, and it keeps the default test run short.
    offset = ("common_offset",) if dtype in (torch.float32, torch.float64, torch.bfloat16) else ()
    return (*offset, "neg_inf_mask", "nan_logits")


def _loss_cases(op: str, dtype: torch.dtype) -> Iterator[Case]:
    targets = ("index", "prob") if op == "cross_entropy" else ("index",)
    smoothing = 0.3 if op == "cross_entropy" else None
    for shape in _SHAPES:
        for target in targets:
            for reduction, eps in (("none", None), (None, smoothing)):
                base = Case(op, shape, dtype, target=target, reduction=reduction, label_smoothing=eps)
                for special in _value_specials(dtype):
                    yield replace(base, special=special)
    # torch takes uint8 targets for 1-D and 2-D input; 'mean' is weighted.
    for ignore_index, shape, reduction in ((None, (200,), "none"), (None, (6, 200), None), (None, (6, 200), "sum"),
                                           (368, (200,), "none"), (368, (6, 200), None), (368, (6, 200), "sum")):
        yield Case(op, shape, dtype, ignore_index=ignore_index, reduction=reduction,
                   weight="positive" if reduction is None else "none", special="uint8_wrapping_target")
    for shape in ((3, 10, 3), (3, 5, 2, 2)):  # K-dimensional: an empty batch only
        for reduction in (None, "sum"):
            yield Case(op, shape, dtype, reduction=reduction, special="uint8_empty_batch")
    if op == "cross_entropy":
        for shape, reduction in (((4, 50), "none"), ((2, 50, 3), "none"), ((4, 50), None)):
            yield Case(op, shape, dtype, target="prob", reduction=reduction, special="confident_prob_target")


def hostile_cases(op: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> Iterator[Case]:
    """Every hostile case of one op of ``HOSTILE_OPS``, in each dtype of ``dtypes``."""
    if op not in HOSTILE_OPS:
        raise ValueError(f"no hostile cases for {op!r}: they cover {', '.join(HOSTILE_OPS)}")
    for dtype in dtypes:
        if op in LOSS_OPS:
            yield from _loss_cases(op, dtype)
            continue
        for shape, dim in (((3, 2500), 1), ((2, 5, 3, 4), -1)):
            for special in _value_specials(dtype):
                yield Case(op, shape, dtype, dim=dim, special=special)
