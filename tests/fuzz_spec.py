"""What the fuzz draws: a ``Spec`` of plain values, and ``build`` to turn it into a call.

A spec holds no tensors. Every tensor is made from ``spec.seed`` by ``build``, so the spec that
hypothesis prints for a failing example is the whole reproducer:

    from tests.fuzz_compare import differences
    from tests.fuzz_spec import Spec
    differences(Spec(...), "cpu")

The strategy aims at the inputs the fixed grid never reaches: C up to 70k (several kernel column
blocks), N = 0, transposed, sliced, expanded and channels-last layouts, magnitudes from 1e-3 to
1e4, large common offsets, -inf masks (whole rows too), NaN, uint8 targets whose ignore_index
wraps onto a class, and label smoothing up to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

LOSS_OPS = ("cross_entropy", "nll_loss")
SOFTMAX_OPS = ("log_softmax", "softmax")
OPS = LOSS_OPS + SOFTMAX_OPS
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last")

# The most elements one call may have, so that the default run stays fast even under the
# Triton interpreter. 70k classes fit in one or two rows.
MAX_ELEMENTS = 1 << 17
MAX_CLASSES = 70_000

# Common offsets that keep the logits representable in each dtype.
OFFSETS = {
    torch.float64: (0.0, -3e3, 6e4, 1e6),
    torch.float32: (0.0, -3e3, 600.0, 6e4),
    torch.bfloat16: (0.0, -3e3, 600.0, 6e4),
    torch.float16: (0.0, -3e3, 600.0, 3e4),
}
# Values whose uint8 wrap (mod 256) is a class index: -100 wraps to 156 and 368 to 112.
IGNORE_INDICES = (-100, -1, -7, 156, 255, 256, 368, 1000, -300, 2**31, -(2**40))


@dataclass(frozen=True)
class Spec:
    """One call of one op, as plain data (see the module docstring)."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    layout: str = "contiguous"
    magnitude: float = 1.0  # the standard deviation of the logits
    offset: float = 0.0  # added to every logit
    neg_inf: str = "none"  # "none", "scattered" (some logits) or "rows" (whole rows too)
    nan: bool = False  # one NaN logit
    # loss ops
    target: str = "index"  # "index", "prob" (a softmax), "confident" (near one-hot, logit agrees), "raw"
    target_dtype: torch.dtype = torch.int64  # a float dtype for probability targets
    ignore_index: int | None = None  # None: not passed (torch's -100)
    weight: str = "none"  # "none", "positive", "some_zero"
    reduction: str | None = None  # None: not passed ('mean')
    label_smoothing: float | None = None
    # softmax ops
    dim: int = -1
    softmax_dtype: torch.dtype | None = None  # the dtype= argument

    @property
    def class_dim(self) -> int:
        if self.op in SOFTMAX_OPS:
            return self.dim % len(self.shape)
        return 0 if len(self.shape) == 1 else 1

    @property
    def precision(self) -> torch.dtype:
        """The dtype the op computes in: the input's, or the dtype= argument that casts it."""
        return self.softmax_dtype or self.dtype


@dataclass
class Call:
    """The arguments of one call: ``fn(input, [target,] **kwargs)``."""

    input: Tensor
    target: Tensor | None
    kwargs: dict[str, Any]

    def leaves(self) -> list[Tensor]:
        """The tensors the gradient is taken with respect to."""
        return [t for t in (self.input, self.target) if isinstance(t, Tensor) and t.requires_grad]

    def invoke(self, fn: Any) -> Any:
        if self.target is None:
            return fn(self.input, **self.kwargs)
        return fn(self.input, self.target, **self.kwargs)


# --------------------------------------------------------------------------------------------
# Building the tensors
# --------------------------------------------------------------------------------------------


def _layout(x: Tensor, spec: Spec, gen: torch.Generator) -> Tensor:
    """The same values in the spec's memory layout (a view that autograd treats as a leaf)."""
    ndim = x.dim()
    if spec.layout == "transposed" and ndim >= 2:  # every dim's stride order reversed
        order = tuple(reversed(range(ndim)))
        return x.permute(order).contiguous().permute(order)
    if spec.layout == "sliced" and ndim >= 1:  # every other element, at an offset, along one dim
        d = int(torch.randint(0, ndim, (), generator=gen))
        wide_shape = list(x.shape)
        wide_shape[d] = 2 * x.shape[d] + 1
        wide = torch.zeros(wide_shape, dtype=x.dtype)
        index = [slice(None)] * ndim
        index[d] = slice(1, None, 2)
        wide[tuple(index)] = x
        return wide[tuple(index)]
    if spec.layout == "expanded" and ndim >= 1:  # one dim of stride 0: its values repeat
        d = int(torch.randint(0, ndim, (), generator=gen))
        return x.narrow(d, 0, min(1, x.shape[d])).expand(x.shape) if x.shape[d] else x
    if spec.layout == "channels_last" and ndim in (4, 5):
        fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x


def _logits(spec: Spec, gen: torch.Generator) -> Tensor:
    """float64 logits: scaled, offset, masked; then clamped into the dtype's range."""
    x = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * spec.magnitude + spec.offset
    if x.numel():
        flat = x.view(-1)
        if spec.neg_inf != "none":
            flat[torch.rand(flat.shape, generator=gen) < 0.2] = -math.inf
        if spec.neg_inf == "rows":  # the first and the last row: all their classes -inf
            rows = x.movedim(spec.class_dim, -1)  # a view, classes last
            rows[(0,) * (x.dim() - 1)] = -math.inf
            rows[(-1,) * (x.dim() - 1)] = -math.inf
        if spec.nan:
            flat[int(torch.randint(0, flat.numel(), (), generator=gen))] = math.nan
    limit = torch.finfo(spec.dtype).max / 2
    return torch.where(x.isfinite(), x.clamp(-limit, limit), x)


def _index_target(spec: Spec, gen: torch.Generator) -> Tensor:
    """Random classes; some rows ignored, or (for a uint8 target) set to the class that
    ignore_index wraps onto, which torch does NOT ignore (it compares in int64)."""
    classes = spec.shape[spec.class_dim]
    rows = spec.shape[: spec.class_dim] + spec.shape[spec.class_dim + 1 :]
    high = min(classes, 256) if spec.target_dtype == torch.uint8 else classes
    target = torch.randint(0, max(high, 1), rows, generator=gen)
    ignore = -100 if spec.ignore_index is None else spec.ignore_index
    if target.numel() > 1:
        info = torch.iinfo(spec.target_dtype)
        wrapped = ignore % 256 if spec.target_dtype == torch.uint8 else ignore
        if info.min <= ignore <= info.max:
            target.view(-1)[::3] = ignore
        elif 0 <= wrapped < classes:
            target.view(-1)[::3] = wrapped
    return target.to(spec.target_dtype)


def _prob_target(spec: Spec, x: Tensor, gen: torch.Generator) -> Tensor:
    dim = spec.class_dim
    if spec.target == "raw":  # torch does not validate: unnormalised, some negative
        return torch.rand(spec.shape, generator=gen, dtype=torch.float64) * 1.5 - 0.25
    if spec.target == "confident" and x.numel():
        # Near one-hot, with the logit agreeing: a loss of about 1e-6 that cancels badly in
        # lse·Σt - Σ t·x.
        classes = spec.shape[dim]
        hot = torch.randint(0, classes, (), generator=gen)
        one_hot = (torch.arange(classes).view([-1] + [1] * (x.dim() - dim - 1)) == hot).double()
        x += one_hot * 20 * max(spec.magnitude, 1.0)
        return one_hot.expand(spec.shape) * (1 - 1e-6) + 1e-6 / classes
    logits = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * 2
    return logits.softmax(dim) if logits.numel() else logits


def build(spec: Spec) -> Call:
    """Fresh tensors for the spec (the same on every call)."""
    gen = torch.Generator().manual_seed(spec.seed)
    values = _logits(spec, gen)
    kwargs: dict[str, Any] = {}
    target: Tensor | None = None
    if spec.op in SOFTMAX_OPS:
        kwargs["dim"] = spec.dim
        if spec.softmax_dtype is not None:
            kwargs["dtype"] = spec.softmax_dtype
    else:
        if spec.target == "index":
            target = _index_target(spec, gen)
        else:
            target = _layout(_prob_target(spec, values, gen).to(spec.target_dtype), spec, gen)
            target = target.detach().requires_grad_(True)
        if spec.weight != "none":
            weight = torch.rand(spec.shape[spec.class_dim], generator=gen, dtype=torch.float64) + 0.5
            if spec.weight == "some_zero":
                weight[::3] = 0
            kwargs["weight"] = weight.to(spec.dtype)
        for name in ("ignore_index", "reduction", "label_smoothing"):
            if getattr(spec, name) is not None:
                kwargs[name] = getattr(spec, name)
    x = _layout(values.to(spec.dtype), spec, gen).detach().requires_grad_(True)
    return Call(x, target, kwargs)


def upstream(spec: Spec, out: Tensor) -> Tensor:
    """A random upstream gradient, the same values for ours, torch and the float64 truth: rounded
    through the precision the op computes in (the truth's float64 output would otherwise get
    digits that ours and torch's never saw)."""
    gen = torch.Generator().manual_seed(spec.seed ^ 0x5EED)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(spec.precision).to(out.dtype)


# --------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------


@st.composite
def _shape(draw: st.DrawFn, ndim: int, class_dim: int) -> tuple[int, ...]:
    """A shape within MAX_ELEMENTS whose class extent is sometimes large, and whose batch is
    sometimes empty."""
    size_class = draw(st.sampled_from(("small", "small", "small", "medium", "large")))
    classes = {
        "small": st.integers(0, 40),
        "medium": st.integers(41, 3000),
        "large": st.integers(3001, MAX_CLASSES),
    }[size_class]
    shape = [draw(classes)]
    budget = MAX_ELEMENTS // max(shape[0], 1)
    for _ in range(ndim - 1):
        size = draw(st.integers(0, max(0, min(7, budget))))
        budget //= max(size, 1)
        shape.append(size)
    others = shape[1:]
    return (*others[:class_dim], shape[0], *others[class_dim:])


@st.composite
def specs(draw: st.DrawFn, ops: tuple[str, ...] = OPS) -> Spec:
    op = draw(st.sampled_from(ops))
    ndim = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if op in SOFTMAX_OPS:
        dim = draw(st.integers(-ndim, ndim - 1))
        class_dim = dim % ndim
    else:
        dim, class_dim = -1, 0 if ndim == 1 else 1
    shape = draw(_shape(ndim, class_dim))
    layouts = [layout for layout in LAYOUTS if layout != "channels_last" or ndim in (4, 5)]
    common = {
        "op": op,
        "shape": shape,
        "dtype": dtype,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "layout": draw(st.sampled_from(layouts)) if ndim >= 2 else draw(st.sampled_from(["contiguous", "sliced"])),
        "magnitude": 10.0 ** draw(st.integers(-3, 4)),
        "offset": draw(st.sampled_from(OFFSETS[dtype])),
        "neg_inf": draw(st.sampled_from(("none", "none", "scattered", "rows"))),
        "nan": draw(st.integers(0, 9)) == 0,
    }
    if op in SOFTMAX_OPS:
        return Spec(**common, dim=dim, softmax_dtype=draw(st.sampled_from((None, None, *FLOAT_DTYPES))))
    if op == "cross_entropy":
        target = draw(st.sampled_from(("index", "index", "prob", "confident", "raw")))
        smoothing = draw(st.one_of(st.none(), st.sampled_from((0.0, 1.0)), st.floats(0.0, 1.0)))
    else:
        target, smoothing = "index", None
    classes = shape[class_dim]
    if target == "index":
        # int64 and uint8 are accepted (uint8 for 1-D and 2-D input only); int32 is refused.
        target_dtype = draw(st.sampled_from((torch.int64, torch.int64, torch.uint8, torch.uint8, torch.int32)))
        colliding = st.integers(0, classes - 1) if classes else st.just(0)
        ignore_index = draw(st.one_of(st.none(), colliding, st.sampled_from(IGNORE_INDICES)))
    else:
        # A float64 target promotes the loss to float64 (torch computes the log-softmax in the
        # input's dtype all the same). torch refuses ignore_index >= 0 with a probability target;
        # any negative one is allowed.
        target_dtype = draw(st.sampled_from((dtype, dtype, torch.float64)))
        ignore_index = draw(st.one_of(st.none(), st.sampled_from((-1, -100))))
    return Spec(
        **common,
        target=target,
        target_dtype=target_dtype,
        ignore_index=ignore_index,
        weight=draw(st.sampled_from(("none", "positive", "some_zero"))),
        reduction=draw(st.sampled_from((None, "none", "mean", "sum"))),
        label_smoothing=smoothing,
    )
