"""The parity grid of ``linear_cross_entropy``: its cases and how their inputs are built.

A case's ``shape`` is ``(H, *logits_shape)``: the hidden size, then the logits' shape, so
``(H, C)`` is an unbatched input, ``(H, N, C)`` a batched one and ``(H, N, C, d1, ...)`` a
K-dimensional linear weight ``(C, d1, ..., H)``. Its ``layout`` is one of

* ``contiguous``;
* ``tied``: the linear weight stored transposed, H outermost (an embedding matrix tied to the
  head, as language models do);
* ``strided``: every other row of the hidden states, and of the linear weight;

each optionally followed by ``+bias``: a ``linear_bias`` is passed. (The bias rides on the layout
rather than in ``extra``, which marks a case as special: the product grid is sampled, the
special cases are not.)

The candidate is called as torch's function is: ``fn(input, linear_weight, target=..., **kw)``.
``Inputs.call`` passes ``Inputs.target`` second, so it holds the linear weight here, and the
loss target travels as a keyword argument.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor

from .grid import DTYPES, Case, Inputs, seed_of

OP = "linear_cross_entropy"

# (H, *logits_shape): unbatched; one row; more rows than classes; C above one kernel column
# block; K-dim weights with one and two extra dims.
SHAPES: tuple[tuple[int, ...], ...] = ((8, 7), (8, 1, 7), (16, 33, 11), (5, 9, 130), (8, 6, 5, 3), (4, 5, 3, 2, 2))
LAYOUTS = ("contiguous", "tied", "strided")
_WEIGHTS = ("none", "positive", "some_zero")


def _hidden_and_logits(case: Case) -> tuple[int, tuple[int, ...]]:
    return case.shape[0], case.shape[1:]


def _rows(x: Tensor, layout: str) -> Tensor:
    """The same values, as every other row of a buffer twice as long (``strided`` layout)."""
    if layout != "strided" or x.dim() < 2:
        return x
    wide = x.new_empty((2 * x.shape[0], *x.shape[1:]))
    wide[::2] = x
    return wide[::2]


def build_linear_inputs(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """The case's tensors, the same on every call and every device."""
    gen = torch.Generator().manual_seed(seed_of(case))
    hidden, logits_shape = _hidden_and_logits(case)
    batched = len(logits_shape) >= 2
    num_classes = logits_shape[1] if batched else logits_shape[0]
    out_features = logits_shape[2:]
    x = torch.randn((*logits_shape[:1], hidden) if batched else (hidden,), generator=gen, dtype=torch.float64)
    # Logits of unit scale or so: each is a sum of H products.
    w = torch.randn((num_classes, *out_features, hidden), generator=gen, dtype=torch.float64) * (2 / math.sqrt(hidden))
    layout, _, with_bias = case.layout.partition("+")
    x = _rows(x.to(case.dtype).to(device), layout)
    w = w.to(case.dtype).to(device)
    if layout == "tied":
        w = w.movedim(-1, 0).contiguous().movedim(0, -1)
    w = _rows(w, layout)
    inputs = Inputs(x, w)
    if case.target == "prob":
        target = torch.randn(logits_shape, generator=gen, dtype=torch.float64).softmax(1 if batched else 0)
        inputs.kwargs["target"] = target.to(case.dtype).to(device)
    else:
        rows = (logits_shape[0], *out_features) if batched else ()
        target = torch.randint(0, max(num_classes, 1), rows, generator=gen)
        ignore = case.ignore_index if case.ignore_index is not None else -100
        if target.numel() > 1:
            target.view(-1)[::3] = ignore
        inputs.kwargs["target"] = target.to(device)
    if with_bias:
        bias = torch.randn((num_classes, *out_features), generator=gen, dtype=torch.float64)
        inputs.kwargs["linear_bias"] = bias.to(case.dtype).to(device)
    if case.weight != "none":
        weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5
        if case.weight == "some_zero":
            weight[::3] = 0
        inputs.kwargs["weight"] = weight.to(case.dtype).to(device)
    for name in ("ignore_index", "reduction", "label_smoothing"):
        if getattr(case, name) is not None:
            inputs.kwargs[name] = getattr(case, name)
    inputs.kwargs.update(case.extra)
    if case.special:
        SPECIALS[case.special](inputs)
    for t in (inputs.input, inputs.target, inputs.kwargs["target"], inputs.kwargs.get("linear_bias")):
        if isinstance(t, Tensor) and t.is_floating_point():
            t.requires_grad_(True)
    return inputs


# --------------------------------------------------------------------------------------------
# Special recipes: invalid arguments (each of torch's checks, in its order) and degenerate values.
# --------------------------------------------------------------------------------------------


def _set(name: str, make: Callable[[Inputs], object]) -> Callable[[Inputs], None]:
    def recipe(inputs: Inputs) -> None:
        value = make(inputs)
        if name == "input":
            inputs.input = value
        elif name == "linear_weight":
            inputs.target = value
        else:
            inputs.kwargs[name] = value

    return recipe


def _target(inputs: Inputs) -> Tensor:
    target: Tensor = inputs.kwargs["target"]
    return target


def _hidden_value(value: float) -> Callable[[Inputs], None]:
    def recipe(inputs: Inputs) -> None:
        x = inputs.input.detach().clone()
        x.view(-1)[0] = value
        inputs.input = x

    return recipe


def _all_ignored(inputs: Inputs) -> None:
    inputs.kwargs["target"] = torch.full_like(_target(inputs), inputs.kwargs.get("ignore_index", -100))


def _first_target(value: int) -> Callable[[Inputs], None]:
    def recipe(inputs: Inputs) -> None:
        t = _target(inputs).clone()
        t.view(-1)[-1] = value
        inputs.kwargs["target"] = t

    return recipe


def _empty_batch(inputs: Inputs) -> None:
    inputs.input = inputs.input[:0]
    inputs.kwargs["target"] = _target(inputs)[:0]


SPECIALS: dict[str, Callable[[Inputs], None]] = {
    "input_3d": _set("input", lambda i: i.input.unsqueeze(0)),
    "input_0d": _set("input", lambda i: i.input.reshape(-1)[0]),
    "weight_1d": _set("linear_weight", lambda i: i.target.reshape(-1)[: i.input.shape[-1]]),
    "hidden_mismatch": _set("linear_weight", lambda i: i.target[..., :-1]),
    "bias_wrong_shape": _set("linear_bias", lambda i: torch.zeros(i.target.shape[0] + 1, dtype=i.input.dtype)),
    "weight_dtype_f64": _set("linear_weight", lambda i: i.target.double()),
    "bias_dtype_f64": _set("linear_bias", lambda i: torch.zeros(i.target.shape[:-1], dtype=torch.float64)),
    "target_int32": _set("target", lambda i: _target(i).int()),
    "target_uint8": _set("target", lambda i: _target(i).clamp(min=0).to(torch.uint8)),
    "target_float_wrong_shape": _set("target", lambda i: _target(i).double()),
    "class_weight_wrong_size": _set("weight", lambda i: torch.ones(2, dtype=i.input.dtype)),
    "class_weight_requires_grad": _set("weight", lambda i: torch.ones(i.target.shape[0], dtype=i.input.dtype,
                                                                       requires_grad=True)),
    "label_smoothing_1.5": _set("label_smoothing", lambda i: 1.5),
    "reduction_invalid": _set("reduction", lambda i: "average"),
    "target_out_of_bounds": _first_target(10_000),
    "all_ignored": _all_ignored,
    "empty_batch": _empty_batch,
    "nan_hidden": _hidden_value(float("nan")),
    "huge_hidden": _hidden_value(1e30),
    "unbatched_target_one": _set("target", lambda i: _target(i).reshape(1)),
    "no_hidden_grad": lambda i: setattr(i, "input", i.input.detach()),
}


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def product_cases(dtypes: tuple[torch.dtype, ...] = DTYPES) -> Iterator[Case]:
    """Every shape × dtype × layout × target × reduction; the weight, ignore_index, smoothing and
    bias axes rotate through those, so that each of their values meets every shape and dtype."""
    combos = itertools.product(SHAPES, dtypes, LAYOUTS, ("index", "prob"), ("none", None, "sum"))
    for i, (shape, dtype, layout, target, reduction) in enumerate(combos):
        if layout != "contiguous" and len(shape) < 3:
            layout = "tied"  # an unbatched input has no rows to stride; its weight can be tied
        ignore_index = (None, 1)[(i // 12) % 2] if target == "index" else None
        if (i // 6) % 2:
            layout += "+bias"
        smoothing = (None, 0.1)[(i // 3) % 2]
        yield Case(OP, shape, dtype, layout, target, _WEIGHTS[i % 3], ignore_index, reduction, smoothing)


def special_cases() -> Iterator[Case]:
    """Each invalid argument and degenerate value, on an ordinary and a K-dim shape."""
    for shape in ((8, 6, 5), (8, 6, 5, 3)):
        base = Case(OP, shape, torch.float32, "contiguous+bias")
        for special in SPECIALS:
            if special != "unbatched_target_one":
                yield replace(base, special=special)
        yield replace(base, target="prob")
        yield replace(base, target="prob", ignore_index=-100)  # refused for a probability target
        yield replace(base, target="prob", special="class_weight_requires_grad")
        yield replace(base, target="prob", special="empty_batch", reduction="none")
        yield replace(base, special="all_ignored", label_smoothing=0.1)
    yield Case(OP, (8, 6, 5, 3), torch.float32, special="input_0d")  # unbatched K-dim: refused
    yield Case(OP, (8, 6), torch.float32, special="unbatched_target_one")
    yield Case(OP, (8, 6), torch.float32, special="unbatched_target_one", label_smoothing=0.1)
    yield Case(OP, (8, 6), torch.float32, target="prob", weight="positive")
    yield Case(OP, (8, 4, 0), torch.float32, target="prob", reduction="sum")  # no classes
    yield Case(OP, (8, 0, 5), torch.float32)  # no rows
    yield Case(OP, (8, 5, 6), torch.float64, "contiguous+bias", target="prob", special="target_float_wrong_shape")


def linear_cases(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[Case]:
    """The product in ``dtypes``, then the special cases whose dtype is one of them."""
    return [*product_cases(dtypes), *(c for c in special_cases() if c.dtype in dtypes)]
