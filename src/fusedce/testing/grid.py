"""The argument grid: every case the parity checker runs, and how each one's inputs are built.

A ``Case`` is plain data (so it prints, hashes and selects well); ``build_inputs`` turns it into
tensors, deterministically from the case's id, on any device. Degenerate and invalid inputs are
named ``special`` recipes applied after the ordinary inputs are built.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

LOSS_OPS = ("cross_entropy", "nll_loss")
SOFTMAX_OPS = ("log_softmax", "softmax")
LINEAR_OPS = ("linear_cross_entropy",)  # its grid lives in linear_grid
OPS = LOSS_OPS + SOFTMAX_OPS + LINEAR_OPS

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

# Loss input shapes: unbatched, a single row, odd sizes, C above one kernel column block, and
# K-dimensional inputs of 3, 4 and 5 dims.
LOSS_SHAPES = ((7,), (1, 7), (123, 7), (7, 123), (3, 2500), (2, 7, 5), (2, 5, 3, 4), (2, 3, 2, 2, 3))
SOFTMAX_SHAPES = ((7,), (7, 123), (3, 2500), (2, 3, 4), (2, 5, 3, 4))
LAYOUTS = ("contiguous", "class_last", "strided")


@dataclass(frozen=True)
class Case:
    """One call: an op, its input's shape, dtype and memory layout, and its arguments.

    ``None`` for an argument means "not passed", so torch's default applies.
    """

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    target: str = "index"  # loss ops: "index" or "prob"
    weight: str = "none"  # "none", "positive", "some_zero"
    ignore_index: int | None = None
    reduction: str | None = None
    label_smoothing: float | None = None
    dim: int | None = None  # softmax ops; None means the deprecated implicit dim
    special: str = ""  # a recipe from SPECIALS applied to the built inputs
    extra: tuple[tuple[str, Any], ...] = field(default=())  # further keyword arguments

    @property
    def id(self) -> str:
        parts = [self.op, "x".join(map(str, self.shape)) or "scalar", _DTYPE_NAMES.get(self.dtype, str(self.dtype))]
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.op in LOSS_OPS + LINEAR_OPS:
            parts.append(self.target)
            if self.weight != "none":
                parts.append(f"w={self.weight}")
            for name in ("ignore_index", "reduction", "label_smoothing"):
                value = getattr(self, name)
                if value is not None:
                    parts.append(f"{name}={value}")
        else:
            parts.append(f"dim={self.dim}")
        parts.extend(f"{k}={v}" for k, v in self.extra)
        if self.special:
            parts.append(self.special)
        return "-".join(parts)

    @property
    def class_dim(self) -> int:
        if self.op in SOFTMAX_OPS:
            dim = self.dim if self.dim is not None else (0 if len(self.shape) in (0, 1, 3) else 1)
            return dim % max(len(self.shape), 1)
        return 0 if len(self.shape) == 1 else 1


@dataclass
class Inputs:
    """What a case calls the function with: ``fn(input, [target,] **kwargs)``."""

    input: Any
    target: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        found = [self.input, self.target, *self.kwargs.values()]
        return [t for t in found if isinstance(t, Tensor)]

    def differentiable(self) -> list[Tensor]:
        return [t for t in self.tensors() if t.requires_grad]

    def call(self, fn: Callable[..., Any]) -> Any:
        if self.target is None:
            return fn(self.input, **self.kwargs)
        return fn(self.input, self.target, **self.kwargs)


def seed_of(case: Case) -> int:
    return zlib.crc32(case.id.encode())


def _apply_layout(x: Tensor, layout: str, class_dim: int) -> Tensor:
    """The same values in another memory layout."""
    if layout == "contiguous" or x.dim() == 0:
        return x
    if layout == "class_last":  # classes innermost in memory: channels-last for 4-D input
        return x.movedim(class_dim, -1).contiguous().movedim(-1, class_dim)
    if layout == "strided":  # every other element of a buffer twice as long in dim 0
        wide = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        wide[::2] = x
        return wide[::2]
    raise ValueError(f"unknown layout {layout!r}")


def build_inputs(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """The case's tensors, the same on every call and every device."""
    if case.op in LINEAR_OPS:
        from .linear_grid import build_linear_inputs

        return build_linear_inputs(case, device)
    gen = torch.Generator().manual_seed(seed_of(case))
    shape, class_dim = case.shape, case.class_dim
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    x = _apply_layout(values.to(case.dtype).to(device), case.layout, class_dim)
    inputs = Inputs(x)
    if case.op in LOSS_OPS:
        inputs.target = _build_target(case, gen, device)
        if case.weight != "none":
            num_classes = shape[class_dim] if shape else 1
            weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5
            if case.weight == "some_zero":
                weight[::3] = 0
            inputs.kwargs["weight"] = weight.to(case.dtype).to(device)
        for name in ("ignore_index", "reduction", "label_smoothing"):
            if getattr(case, name) is not None:
                inputs.kwargs[name] = getattr(case, name)
    else:
        inputs.kwargs["dim"] = case.dim
    inputs.kwargs.update(case.extra)
    if case.special:
        SPECIALS[case.special](case, inputs)
    for t in (inputs.input, inputs.target):
        if isinstance(t, Tensor) and t.is_floating_point():
            t.requires_grad_(True)
    return inputs


def _build_target(case: Case, gen: torch.Generator, device: str | torch.device) -> Tensor:
    shape, class_dim = case.shape, case.class_dim
    if case.target == "prob":
        logits = torch.randn(shape, generator=gen, dtype=torch.float64)
        return logits.softmax(class_dim if shape else 0).to(case.dtype).to(device)
    num_classes = shape[class_dim]
    rows = shape[:class_dim] + shape[class_dim + 1 :]
    target = torch.randint(0, max(num_classes, 1), rows, generator=gen)
    ignore = case.ignore_index if case.ignore_index is not None else -100
    if target.numel() > 1:
        target.view(-1)[::3] = ignore  # some ignored rows (ignore_index may be a real class)
    return target.to(device)


# --------------------------------------------------------------------------------------------
# Special recipes: degenerate values and every invalid input docs/semantics.md section 5 lists.
# Each mutates the freshly built inputs.
# --------------------------------------------------------------------------------------------


def _set_input(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> None:
    with torch.no_grad():
        inputs.input = fn(inputs.input.detach().clone())


def _scattered_neg_inf(case: Case, inputs: Inputs) -> None:
    """-inf at every fifth logit: finite CE away from the target, inf at it (or with smoothing),
    NaN for a probability target of 0 there."""

    def poke(x: Tensor) -> Tensor:
        x.view(-1)[1::5] = float("-inf")
        return x

    _set_input(inputs, poke)


def _row_fill(value: float) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        def fill(x: Tensor) -> Tensor:
            index: list[int | slice] = [0] * x.dim()
            index[case.class_dim] = slice(None)
            x[tuple(index)] = value
            return x

        _set_input(inputs, fill)

    return recipe


def _one_value(value: float) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        def poke(x: Tensor) -> Tensor:
            x.view(-1)[0] = value
            return x

        _set_input(inputs, poke)

    return recipe


def _target_value(value: int) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        inputs.target = inputs.target.clone()
        inputs.target.view(-1)[-1] = value

    return recipe


def _all_ignored(case: Case, inputs: Inputs) -> None:
    ignore = case.ignore_index if case.ignore_index is not None else -100
    inputs.target = torch.full_like(inputs.target, ignore)


def _empty_batch(case: Case, inputs: Inputs) -> None:
    if inputs.input.dim() >= 2:  # an unbatched input has no batch to empty
        inputs.input = inputs.input.detach()[:0]
        inputs.target = inputs.target.detach()[:0]


def _zero_weight(case: Case, inputs: Inputs) -> None:
    inputs.kwargs["weight"] = torch.zeros(case.shape[case.class_dim], dtype=case.dtype, device=inputs.input.device)


def _set_kwarg(name: str, value: Any) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        inputs.kwargs[name] = value

    return recipe


def _weight_of(size: Callable[[int], tuple[int, ...]], dtype: torch.dtype | None = None,
               requires_grad: bool = False) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        gen = torch.Generator().manual_seed(seed_of(case) + 1)
        weight = torch.rand(size(case.shape[case.class_dim]), generator=gen, dtype=torch.float64)
        weight = weight.to(dtype or case.dtype)
        inputs.kwargs["weight"] = weight.to(inputs.input.device).requires_grad_(requires_grad)

    return recipe


def _target_transform(fn: Callable[[Tensor], Any]) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        inputs.target = fn(inputs.target.detach())

    return recipe


def _input_transform(fn: Callable[[Tensor], Tensor]) -> Callable[[Case, Inputs], None]:
    def recipe(case: Case, inputs: Inputs) -> None:
        inputs.input = fn(inputs.input.detach())

    return recipe


def _int_input_with_float_dtype(case: Case, inputs: Inputs) -> None:
    """An integer input is fine for the softmax family when ``dtype=`` makes it floating."""
    inputs.input = (inputs.input.detach() * 3).long()
    inputs.kwargs["dtype"] = torch.float32


def _as_built(case: Case, inputs: Inputs) -> None:
    """For a case whose shape or arguments make it special: the inputs stay as built."""


SPECIALS: dict[str, Callable[[Case, Inputs], None]] = {
    # degenerate values (valid calls)
    "all_ignored": _all_ignored,
    "empty_batch": _empty_batch,
    "zero_weight": _zero_weight,
    "neg_inf_logits": _scattered_neg_inf,
    "neg_inf_row": _row_fill(float("-inf")),
    "pos_inf_logit": _one_value(float("inf")),
    "nan_logit": _one_value(float("nan")),
    "huge_logits": _input_transform(lambda x: x * 1e4),
    # invalid targets
    "target_out_of_bounds": _target_value(10_000),
    "target_negative": _target_value(-1),
    "batch_mismatch": _target_transform(lambda t: t[1:] if t.dim() else t),
    "target_2d_extra": _target_transform(lambda t: t.unsqueeze(-1).expand(*t.shape, 2).contiguous()),
    "target_spatial_mismatch": _target_transform(lambda t: t[..., :-1] if t.dim() >= 2 else t),
    "target_missing_spatial": _target_transform(lambda t: t.reshape(t.shape[0], -1)[:, 0] if t.dim() >= 2 else t),
    "target_float": _target_transform(lambda t: t.float()),
    "target_int32": _target_transform(lambda t: t.int()),
    "target_uint8": _target_transform(lambda t: t.clamp(min=0).to(torch.uint8)),
    "target_bool": _target_transform(lambda t: t.clamp(0, 1).bool()),
    "target_unbatched_one": _target_transform(lambda t: t.reshape(1) if t.dim() == 0 else t),
    "target_unbatched_two": _target_transform(lambda t: torch.stack([t, t]) if t.dim() == 0 else t),
    "prob_target_long": _target_transform(lambda t: t.long()),
    "prob_target_f64": _target_transform(lambda t: t.double()),
    "prob_target_f16": _target_transform(lambda t: t.half()),
    # invalid weights
    "weight_wrong_size": _weight_of(lambda c: (c + 1,)),
    "weight_2d": _weight_of(lambda c: (1, c)),
    "weight_f64": _weight_of(lambda c: (c,), dtype=torch.float64),
    "weight_requires_grad": _weight_of(lambda c: (c,), requires_grad=True),
    # invalid arguments
    "label_smoothing_1.5": _set_kwarg("label_smoothing", 1.5),
    "label_smoothing_negative": _set_kwarg("label_smoothing", -0.5),
    "label_smoothing_nan": _set_kwarg("label_smoothing", float("nan")),
    "label_smoothing_tensor": _set_kwarg("label_smoothing", torch.tensor(0.2)),
    "ignore_index_float": _set_kwarg("ignore_index", 1.0),
    "ignore_index_bool": _set_kwarg("ignore_index", True),
    # The default -100 as a 0-dim tensor: the ignored targets stay ignored.
    "ignore_index_tensor": _set_kwarg("ignore_index", torch.tensor(-100)),
    "reduction_invalid": _set_kwarg("reduction", "avg"),
    "reduction_none_object": _set_kwarg("reduction", None),
    "reduction_elementwise_mean": _set_kwarg("reduction", "elementwise_mean"),
    "target_list": _target_transform(lambda t: t.tolist()),
    # invalid inputs
    "input_int": _input_transform(lambda x: x.long()),
    "input_zero_dim": _input_transform(lambda x: x.reshape(-1)[0]),
    "dim_out_of_range": lambda case, inputs: inputs.kwargs.update(dim=len(case.shape)),
    "dim_str": _set_kwarg("dim", "C"),
    "dtype_f64": _set_kwarg("dtype", torch.float64),
    "dtype_long": _set_kwarg("dtype", torch.int64),
    "int_input_dtype_f32": _int_input_with_float_dtype,
    # Cases special in their shape or arguments alone: the recipe only names them.
    "scalar_input": _as_built,
    "dtype_f32": _as_built,
    "legacy_reduction": _as_built,
    "no_classes": _as_built,
    "no_rows": _as_built,
    "empty_spatial": _as_built,
    "prob_ignore_index": _as_built,
}


# --------------------------------------------------------------------------------------------
# The grids
# --------------------------------------------------------------------------------------------


def _layouts_for(shape: tuple[int, ...]) -> tuple[str, ...]:
    return LAYOUTS if len(shape) >= 2 else ("contiguous",)


def loss_cases(op: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> Iterator[Case]:
    """The full product for a loss op: shape × dtype × layout × target × weight × ignore_index ×
    reduction × label_smoothing (nll_loss has index targets and no smoothing)."""
    targets = ("index", "prob") if op == "cross_entropy" else ("index",)
    smoothings = (None, 0.1, 1.0) if op == "cross_entropy" else (None,)
    for shape, dtype in itertools.product(LOSS_SHAPES, dtypes):
        for layout, target, weight, ignore_index, reduction, smoothing in itertools.product(
            _layouts_for(shape), targets, ("none", "positive", "some_zero"), (None, 1, -1),
            ("none", None, "sum"), smoothings,
        ):
            yield Case(op, shape, dtype, layout, target, weight, ignore_index, reduction, smoothing)


def softmax_cases(op: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> Iterator[Case]:
    """Every shape × dtype × layout × reduced dim (and the implicit dim)."""
    for shape, dtype in itertools.product(SOFTMAX_SHAPES, dtypes):
        for layout in _layouts_for(shape):
            for dim in (None, *range(-1, len(shape))):
                yield Case(op, shape, dtype, layout, dim=dim)


def special_cases(op: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> Iterator[Case]:
    """Degenerate and invalid inputs, each on a few shapes, in every dtype of ``dtypes``.

    Every one carries a ``special`` tag (a recipe of ``SPECIALS``, possibly one that changes
    nothing and only names the case), so a sample of the grid can always keep all of them.
    """
    for base in _special_bases(op):
        for dtype in dtypes:
            yield replace(base, dtype=dtype)


def _special_bases(op: str) -> Iterator[Case]:
    """The special cases of one op, in float32 (``special_cases`` repeats them per dtype)."""
    if op in SOFTMAX_OPS:
        yield from _softmax_special_bases(op)
    else:
        yield from _loss_special_bases(op)


def _softmax_special_bases(op: str) -> Iterator[Case]:
    softmax_shapes: tuple[tuple[int, ...], ...] = ((7,), (4, 6), (2, 3, 4))
    for shape in softmax_shapes:
        for special in ("neg_inf_row", "pos_inf_logit", "nan_logit", "neg_inf_logits", "huge_logits",
                        "dim_out_of_range", "dim_str", "dtype_f64", "dtype_long", "input_int",
                        "int_input_dtype_f32"):
            yield Case(op, shape, dim=1 if len(shape) > 1 else 0, special=special)
    yield Case(op, (), dim=0, special="scalar_input")
    yield Case(op, (), dim=None, special="scalar_input")
    yield Case(op, (4, 6), dim=1, extra=(("dtype", torch.float32),), special="dtype_f32")


def _loss_special_bases(op: str) -> Iterator[Case]:
    index_specials: tuple[str, ...] = (
        "all_ignored", "empty_batch", "zero_weight", "neg_inf_logits", "neg_inf_row", "pos_inf_logit",
        "nan_logit", "huge_logits", "target_out_of_bounds", "target_negative", "batch_mismatch",
        "target_2d_extra", "target_spatial_mismatch", "target_missing_spatial", "target_float",
        "target_int32", "target_uint8", "target_bool", "target_unbatched_one", "target_unbatched_two",
        "weight_wrong_size",
        "weight_2d", "weight_f64", "weight_requires_grad", "ignore_index_float", "ignore_index_bool",
        "ignore_index_tensor", "reduction_invalid", "reduction_none_object", "reduction_elementwise_mean",
        "target_list", "input_int", "input_zero_dim",
    )
    if op == "cross_entropy":
        index_specials += ("label_smoothing_1.5", "label_smoothing_negative", "label_smoothing_nan",
                           "label_smoothing_tensor")
    prob_specials = ("empty_batch", "neg_inf_logits", "neg_inf_row", "nan_logit", "prob_target_long",
                     "prob_target_f64", "prob_target_f16", "weight_wrong_size", "weight_2d",
                     "weight_f64", "weight_requires_grad", "label_smoothing_1.5", "input_zero_dim")
    shapes: tuple[tuple[int, ...], ...] = ((7,), (6, 5), (3, 5, 4), (2, 5, 3, 4), (2, 3, 2, 2, 3))
    for shape in shapes:
        for reduction, weight in (("none", "none"), (None, "positive"), ("sum", "some_zero")):
            base = Case(op, shape, reduction=reduction, weight=weight)
            for special in index_specials:
                yield replace(base, special=special)
                if op == "cross_entropy":
                    yield replace(base, special=special, label_smoothing=0.2)
            if op == "cross_entropy":
                for special in prob_specials:
                    yield replace(base, target="prob", special=special)
                # ignore_index >= 0 is refused with a probability target.
                yield replace(base, target="prob", ignore_index=0, special="prob_ignore_index")
    # Legacy size_average / reduce, every combination.
    for size_average, reduce in itertools.product((None, True, False), repeat=2):
        if size_average is None and reduce is None:
            continue
        extra = (("size_average", size_average), ("reduce", reduce))
        yield Case(op, (6, 5), extra=extra, special="legacy_reduction")
        yield Case(op, (6, 5), reduction="sum", weight="positive", extra=extra, special="legacy_reduction")
    # C = 0 and a K-dimensional empty extent.
    yield Case(op, (3, 0), special="no_classes")
    yield Case(op, (0, 0), special="no_classes")
    yield Case(op, (2, 4, 0), reduction="none", special="empty_spatial")
    yield Case(op, (2, 4, 0), special="empty_spatial")
    if op == "cross_entropy":
        yield Case(op, (3, 0), target="prob", special="no_classes")
        yield Case(op, (0, 4), target="prob", reduction="sum", special="no_rows")


def default_grid(ops: tuple[str, ...] = OPS, dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[Case]:
    """The full grid: the whole argument product for each op, then its special cases."""
    from .hostile import hostile_cases  # registers its recipes in SPECIALS (it imports this module)

    cases: list[Case] = []
    for op in ops:
        if op in LINEAR_OPS:
            from .linear_grid import linear_cases

            cases.extend(linear_cases(dtypes))
            continue
        cases.extend(hostile_cases(op, dtypes))
        cases.extend(loss_cases(op, dtypes) if op in LOSS_OPS else softmax_cases(op, dtypes))
        cases.extend(special_cases(op, dtypes))
    return cases


def sample(cases: list[Case], every: int) -> list[Case]:
    """A deterministic 1-in-``every`` subset, spread over the grid (for slow backends)."""
    return [c for c in cases if seed_of(c) % every == 0]
