"""torch's functional signatures, exactly: validation, canonical form, and the reduction.

Each function here mirrors its ``torch.nn.functional`` namesake argument for argument. The work
itself happens in the autograd Functions (``_autograd``); the reduction happens here, in torch,
over the per-row losses the kernels return. That keeps 'none' free, and there is no host sync.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor
from torch.nn import _reduction
from torch.nn import functional as torch_functional

from . import _autograd, _checks
from ._canonical import canonical, canonical_rows
from ._extras import LossExtras, loss_extras
from .kernels.reference import accumulation_dtype

__all__ = ["cross_entropy", "linear_cross_entropy", "log_softmax", "nll_loss", "softmax"]

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS: tuple[Reduction, ...] = ("none", "mean", "sum")


def _resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> Reduction:
    """The legacy arguments override ``reduction`` (with torch's warning); then the string is
    validated, warning for 'elementwise_mean' and raising for anything unknown."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return _REDUCTIONS[_reduction.get_enum(reduction)]


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


@overload
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]: ...


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.cross_entropy``, fused: the log-probabilities are never stored.

    ``inplace_backward=True`` (fusedce only) writes the gradient into ``input``'s own storage
    during backward, so forward plus backward allocates nothing of the logits' size. It
    overwrites the logits: use it only when nothing else reads them after the loss (the usual
    LM-head case), and never with ``create_graph=True``.

    The LLM extras (fusedce only, keyword-only, index targets only; the defaults leave the call
    exactly torch's). They are fused into the kernels: the forward still reads the logits once,
    the backward reads them once and writes the gradient once.

    * ``logit_softcap=cap`` (a positive number): the logits become ``x' = cap·tanh(x / cap)``
      before the softmax (Gemma 2's ``final_logit_softcapping``; Liger's ``softcap``). Everything
      else (weight, ignore_index, label smoothing, reduction, z-loss, the returned lse) applies to
      ``x'``, and the gradient carries the chain factor ``1 - tanh²(x / cap)``.
    * ``z_loss=z`` (a number ≥ 0): PaLM's auxiliary loss. Each non-ignored row's loss gains
      ``z·lse²`` with ``lse = log Σ_c exp(x'_c)``, unweighted (the class weight does not scale it),
      so the gradient gains ``2z·lse·softmax(x')_c``. 'none' returns the per-row sum, 'sum' sums
      it, and 'mean' divides it by the main loss's own denominator (the non-ignored rows' summed
      target weights, their count without a weight). This is Liger's ``lse_square_scale``
      exactly without a class weight; with one, Liger divides its z-term by the count of
      non-ignored rows instead of the summed weights.
    * ``return_lse=True``: returns ``(loss, lse)``, with ``lse`` the per-row log-sum-exp of
      ``x'`` (every row, ignored ones included), shaped like the 'none' loss, in the
      accumulation dtype (float32 for float16/bfloat16/float32 input, float64 for float64). It
      is formed from the kernel's row stats (no extra pass) and carries no gradient: use
      ``z_loss`` for a gradient through the lse.
    """
    if z_loss != 0.0 or logit_softcap is not None or return_lse:
        return _cross_entropy_with_extras(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
            inplace_backward, loss_extras(z_loss, logit_softcap, return_lse),
        )  # fmt: skip
    if (
        _is_plain_call(input, target, weight, size_average, reduce, label_smoothing, inplace_backward)
        and (reduction == "mean" or reduction == "sum")
        and type(ignore_index) is int
        and _INT64_MIN <= ignore_index <= _INT64_MAX
    ):
        # The common call, in one op: no check below could fail or warn for it.
        return _autograd.cross_entropy_reduced(input, target, ignore_index, reduction == "mean")[0]
    if type(input) is not Tensor and _is_dtensor(input):  # tensor parallelism: fusedce.distributed
        from .distributed import dtensor

        args = (size_average, ignore_index, reduce, reduction, label_smoothing, inplace_backward)
        return dtensor.cross_entropy(input, target, weight, *args)
    mode = _resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.loss_arguments("cross_entropy_loss", input, target, weight, ignore_index)
    smoothing = _checks.to_float_arg("cross_entropy_loss", "label_smoothing", 6, label_smoothing)
    if _checks.is_probability_target(input, target):
        return _cross_entropy_prob(input, target, weight, ignore_index, smoothing, mode, inplace_backward)
    return _cross_entropy_index(input, target, weight, ignore_index, smoothing, mode, inplace_backward)[0]


def _cross_entropy_with_extras(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    size_average: bool | None,
    ignore_index: int,
    reduce: bool | None,
    reduction: str,
    label_smoothing: float,
    inplace_backward: bool,
    extras: LossExtras,
) -> Tensor | tuple[Tensor, Tensor]:
    """cross_entropy with z_loss, logit_softcap or return_lse: torch's checks, then the general
    index path (never the fast path, whose fused op has no extras)."""
    if type(input) is not Tensor and _is_dtensor(input):
        raise NotImplementedError("fusedce: z_loss, logit_softcap and return_lse do not support DTensor logits")
    mode = _resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.loss_arguments("cross_entropy_loss", input, target, weight, ignore_index)
    smoothing = _checks.to_float_arg("cross_entropy_loss", "label_smoothing", 6, label_smoothing)
    if _checks.is_probability_target(input, target):
        raise NotImplementedError(
            "fusedce: z_loss, logit_softcap and return_lse support class-index targets only, "
            "not class probabilities"
        )
    loss, lse = _cross_entropy_index(input, target, weight, ignore_index, smoothing, mode, inplace_backward, extras)
    return (loss, lse) if lse is not None else loss


def _is_dtensor(x: object) -> bool:
    """A DTensor, checked without importing torch.distributed.tensor: none exists until it is."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active


def _is_plain_call(
    input: object, target: object, weight: object, size_average: object, reduce: object,
    label_smoothing: object, inplace_backward: bool,
) -> bool:
    """True for cross_entropy's common call, which the fused reduced op handles whole: eager mode,
    plain CPU or CUDA tensors (on one device), (N, C) floating logits and (N,) int64 targets of the
    same batch, no weight, no smoothing, no legacy arguments. Cheapest and likeliest-to-fail tests first; torch.compile
    comes before the functorch queries, which Dynamo cannot trace."""
    return (
        weight is None
        and type(input) is Tensor
        and type(target) is Tensor
        and size_average is None
        and reduce is None
        and not inplace_backward
        and type(label_smoothing) is float
        and not label_smoothing > 0  # ε ≤ 0 or NaN is no smoothing (check_label_smoothing)
        and input.dim() == 2
        and input.shape[1] != 0  # no classes: the general path (ce_forward) handles C = 0
        and target.dim() == 1
        and target.dtype is torch.int64
        and ((input.is_cpu and target.is_cpu) or (input.is_cuda and target.device == input.device))
        and input.is_floating_point()
        and input.shape[0] == target.shape[0]
        and not torch.compiler.is_compiling()
        and not _transforms_active()
        and not _is_wrapped(input)
    )


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _cross_entropy_index(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    reduction: Reduction,
    inplace_backward: bool,
    extras: LossExtras | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The loss, and the per-row lse when ``extras`` asks for it (None otherwise)."""
    # torch's order: the smoothing range, then log_softmax's checks, then nll_loss's.
    smoothing = _checks.check_label_smoothing(smoothing)
    class_dim = _checks.wrap_dim(_class_dim(input), input.dim())
    _checks.check_softmax_dtype("log_softmax", input, class_dim)
    _checks.check_nll(input, target, weight, reduction)
    if smoothing > 0:
        _checks.check_smoothing_quirks(input, target, weight, reduction, ignore_index)

    x = canonical(input, class_dim)
    _check_inplace_backward(inplace_backward, input, x)
    rows = canonical_rows(target, x.shape[0], x.shape[2])
    weight = _flat_weight(weight)
    stats = None
    if extras is None and _smoothing_mask_wraps(target, ignore_index, smoothing):
        if inplace_backward:
            raise ValueError(
                "fusedce: inplace_backward=True is not supported for a uint8 target with label smoothing "
                "and an ignore_index outside 0..255 (torch's two terms need two kernel passes)"
            )
        _unbatched_target_quirk(input, target, x.new_zeros(()), smoothing)  # raises, as torch does
        reduced = _uint8_smoothing_quirk(x, rows, weight, ignore_index, smoothing, reduction, input)
    else:
        if extras is None:
            loss, _ = _autograd.cross_entropy(x, rows, weight, ignore_index, smoothing, inplace_backward)
        else:
            args = (ignore_index, smoothing, extras.z_loss, extras.softcap, inplace_backward)
            loss, stats = _autograd.cross_entropy_extras(x, rows, weight, *args)
        loss = _unbatched_target_quirk(input, target, loss, smoothing)
        reduced = _reduce_index_loss(loss, rows, weight, ignore_index, reduction, input, smoothing)
    if smoothing > 0 and x.shape[1] == 0:
        # torch scales the smoothing term, an empty sum (0) with no classes, by ε/C = inf after
        # masking the ignored rows: NaN on every row, ignored ones included, and NaN for every
        # reduction, even of no rows. (The kernels leave the term out when C = 0.)
        reduced = reduced + float("nan")
    reduced = _byte_target_backward_quirk(input, target, reduced)
    if stats is None or extras is None or not extras.return_lse:
        return reduced, None
    # m + log Σ exp(x' - m), rounded once: the lse for the caller, not for further kernels.
    lse = stats[..., 0] + stats[..., 1]
    return reduced, lse.reshape(_rows_shape(input) if input.dim() != 1 else ())


def _cross_entropy_prob(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    reduction: Reduction,
    inplace_backward: bool,
) -> Tensor:
    _checks.check_probability_target(input, target, weight, ignore_index)
    class_dim = _class_dim(input)
    _checks.check_softmax_dtype("log_softmax", input, class_dim)
    smoothing = _checks.check_label_smoothing(smoothing)

    # Ordinary type promotion decides the result dtype (an f64 target makes an f64 loss); the
    # fused kernel then sees one dtype. torch computes log_softmax in the input's dtype first,
    # so computing it in the promoted dtype is never less accurate.
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    if inplace_backward and input.dtype != dtype:
        raise ValueError(
            f"fusedce: inplace_backward=True cannot write a {dtype} gradient into {input.dtype} logits; "
            "give the target and weight the logits' dtype"
        )
    x = canonical(input.to(dtype), class_dim)
    _check_inplace_backward(inplace_backward, input, x)
    t = canonical(target.to(dtype), class_dim)
    w = None if weight is None else weight.to(dtype).contiguous()
    loss, _ = _autograd.cross_entropy_prob(x, t, w, smoothing, inplace_backward)

    if reduction == "none":
        return loss.reshape(_rows_shape(input)).to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    if not input.numel():
        # torch fills the sum of an empty input (C = 0 too) with NaN rather than dividing 0 by 0,
        # so the value is NaN while its forward-mode tangent stays 0.
        return (total * 0 + float("nan")).to(dtype)
    # torch divides by the number of rows.
    return (total / loss.numel()).to(dtype)


def _rows_shape(input: Tensor) -> tuple[int, ...]:
    """The 'none' output shape: the input's without the class dim; () for an unbatched input."""
    if input.dim() <= 1:
        return ()
    return (input.shape[0], *input.shape[2:])


def _flat_weight(weight: Tensor | None) -> Tensor | None:
    # The spatial path accepts any weight of C elements, a (1, C) one included.
    return None if weight is None else weight.reshape(-1).contiguous()


def _check_inplace_backward(inplace_backward: bool, input: Tensor, x: Tensor) -> None:
    """inplace_backward must write the gradient over the user's logits, or it saves nothing."""
    if not inplace_backward:
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "fusedce: inplace_backward=True cannot run inside torch.compile (its backward overwrites "
            "a graph input); compile without it, or compute the loss outside the compiled region"
        )
    if any(stride == 0 and size > 1 for size, stride in zip(input.shape, input.stride(), strict=False)):
        raise ValueError(
            "fusedce: inplace_backward=True needs logits whose elements do not overlap in memory "
            "(this input is expanded)"
        )
    if x.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
        raise ValueError(
            "fusedce: inplace_backward=True needs logits that can be viewed as (N, C, d1*...*dk) "
            "without a copy; call .contiguous() on them first"
        )


def _smoothing_mask_wraps(target: Tensor, ignore_index: int, smoothing: float) -> bool:
    """torch's label-smoothing term masks the rows whose target equals ignore_index compared in
    the target's own dtype: for a uint8 target an ignore_index outside 0..255 wraps (-100 to 156,
    256 to 0), so a row of class 156 loses its smoothing term while its NLL term, compared in
    int64, counts. Only then do the two terms need separate masks (``_uint8_smoothing_quirk``)."""
    return smoothing > 0 and target.dtype == torch.uint8 and not 0 <= ignore_index <= 255


def _uint8_smoothing_quirk(
    x: Tensor, rows: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float,
    reduction: Reduction, input: Tensor,
) -> Tensor:
    """torch's ``(1-ε)·NLL + (ε/C)·smooth`` with the smoothing term masked where the uint8 target
    equals ``ignore_index % 256`` (``_smoothing_mask_wraps``), and under 'mean' each term divided
    by its own count, as torch divides them. (A weighted 'mean' with a uint8 target raises
    earlier.)

    This rare path is torch's formula on one log-softmax, which it materialises: both terms from
    the same log-probabilities, as torch's, so that their gradients, which are summed and may
    cancel (a class with p near 1 gets (1-ε)·(p - 1) + ε·(p - 1/C)), carry the same roundings
    (two separately computed ones were 9.6e-6 off where torch was 2.8e-6, found by the fuzz)."""
    # One float32 copy of half-precision logits: the terms' gradients add up in float32 and round
    # to the input's dtype once.
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # Over the last dim: torch's log_softmax over dim 1 of the (outer, C, inner) form takes its
    # strided kernel, whose float32 log-sum was off by 4e-6 relative where the last-dim one is
    # within an ulp or two (found by the fuzz: a (2, 503) input, its gradient).
    log_p = torch.log_softmax(x.transpose(1, 2), dim=2).transpose(1, 2)
    index = rows.long()
    nll = -log_p.gather(1, index.unsqueeze(1)).squeeze(1)
    if weight is not None:
        nll = nll * weight.to(log_p.dtype)[index]
        log_p = log_p * weight.to(log_p.dtype).reshape(1, -1, 1)
    smooth = -log_p.sum(1) / x.shape[1]
    kept = rows != ignore_index % 256
    smooth = torch.where(kept, smooth, 0)
    if reduction != "mean":
        combined = (1 - smoothing) * nll + smoothing * smooth
        return _reduce_index_loss(combined, rows, weight, ignore_index, reduction, input, 0.0)
    valid = index != ignore_index  # every row: ignore_index is outside the uint8 range
    nll_mean = nll.sum() / valid.sum()
    smooth_mean = smooth.sum() / kept.sum()
    return ((1 - smoothing) * nll_mean + smoothing * smooth_mean).to(input.dtype)


def _unbatched_target_quirk(input: Tensor, target: Tensor, loss: Tensor, smoothing: float) -> Tensor:
    """torch accepts a (1,) target for a (C,) input in the forward, but its backward raises
    (and with label smoothing, so does its forward)."""
    if input.dim() == 1 and target.dim() == 1:
        if smoothing > 0:
            raise RuntimeError("output with shape [] doesn't match the broadcast shape [1]")
        message = f"size mismatch (got input: {_checks.shape_str(input)}, target: {_checks.shape_str(target)})"
        return _autograd.fail_in_backward(loss, message)
    return loss


def _byte_target_backward_quirk(input: Tensor, target: Tensor, loss: Tensor) -> Tensor:
    """torch's spatial (K-dimensional) nll kernels read the target as int64. The forward returns
    early for an empty input's 'mean' or 'sum', so a uint8 target gets that far (the only case in
    which it does, ``check_nll_dtypes``), but the backward raises."""
    if input.dim() >= 3 and target.dtype == torch.uint8:
        return _autograd.fail_in_backward(loss, "expected scalar type Long but found Byte")
    return loss


def _reduce_index_loss(
    loss: Tensor,
    rows: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    input: Tensor,
    smoothing: float,
) -> Tensor:
    """'mean' divides by the summed target weights of the non-ignored rows (their count when
    there is no weight), so all-ignored or empty input gives 0/0 = NaN, as in torch."""
    if reduction == "none":
        return loss.reshape(_rows_shape(input) if input.dim() != 1 else ()).to(input.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(input.dtype)
    # Compared as int64, as torch does: a uint8 target of 156 is not ignore_index -100.
    rows = rows if rows.dtype == torch.int64 else rows.long()
    valid = rows != ignore_index
    if weight is None:
        # count_nonzero, not sum: a bool sum first copies the mask to int64 (a fresh N-row buffer)
        denominator = torch.count_nonzero(valid)
    else:
        # Clamp so that an out-of-range target (which the CUDA kernels report as NaN instead of
        # raising) cannot index out of bounds here.
        acc = accumulation_dtype(input.dtype)
        if weight.numel() == 0:  # no classes, so every row is ignored: nothing to pick
            picked = torch.zeros(rows.shape, dtype=acc, device=rows.device)
        else:
            safe = rows.clamp(0, weight.numel() - 1)
            picked = weight.to(acc).gather(0, safe.reshape(-1)).view_as(safe)
        denominator = torch.where(valid, picked, 0).sum()
    if smoothing > 0:
        # torch divides its NLL and smoothing terms separately; with a zero denominator the NLL
        # term is 0/0, so the mean (and every non-ignored row's gradient) is NaN, not inf.
        denominator = torch.where(denominator == 0, float("nan"), denominator)
    elif input.dim() == 1 and input.device.type == "cuda":
        # torch's CUDA kernel for one unbatched sample returns 0 for an ignored target where
        # its CPU kernel gives 0/0 = NaN ("if the only element was omitted, we get 0"; a valid
        # target of weight 0 is still NaN). Dividing by 1 there keeps the gradient 0, not 0/0.
        denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    return (total / denominator).to(input.dtype)


# --------------------------------------------------------------------------------------------
# nll_loss
# --------------------------------------------------------------------------------------------


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``torch.nn.functional.nll_loss``."""
    mode = _resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.loss_arguments("nll_loss_nd", input, target, weight, ignore_index)
    _checks.check_nll(input, target, weight, mode)

    x = canonical(input, _class_dim(input))
    rows = canonical_rows(target, x.shape[0], x.shape[2])
    weight = _flat_weight(weight)
    loss = _autograd.nll_loss(x, rows, weight, ignore_index)
    loss = _unbatched_target_quirk(input, target, loss, 0.0)
    reduced = _reduce_index_loss(loss, rows, weight, ignore_index, mode, input, 0.0)
    return _byte_target_backward_quirk(input, target, reduced)


# --------------------------------------------------------------------------------------------
# softmax and log_softmax
# --------------------------------------------------------------------------------------------


def _softmax_like(
    kernel: str, function: Callable[[Tensor], Tensor], input: Tensor, dim: int | None,
    stacklevel: int, dtype: torch.dtype | None,
) -> Tensor:
    _checks.check_tensor(kernel, "input", 0, input)
    if dim is None:
        # torch's own helper: the same deprecation warning, attributed to the same frame.
        dim = torch_functional._get_softmax_dim(kernel, input.dim(), stacklevel + 1)  # type: ignore[attr-defined]
    dim = _checks.to_int_arg(kernel, "dim", 1, dim)
    if dtype is not None:
        input = input.to(dtype)  # cast first: int input works with a float dtype, as in torch
    dim = _checks.wrap_dim(dim, input.dim())
    _checks.check_softmax_dtype(kernel, input, dim)
    out = function(canonical(input, dim))
    return out.view(input.shape)


def log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.nn.functional.log_softmax``."""
    return _softmax_like("log_softmax", _autograd.log_softmax, input, dim, _stacklevel, dtype)


def softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.nn.functional.softmax``."""
    return _softmax_like("softmax", _autograd.softmax, input, dim, _stacklevel, dtype)


# torch.nn.functional has it too; it lives in its own package (``fusedce.linear``), which uses
# the helpers above, so it is imported last.
from .linear import linear_cross_entropy  # noqa: E402
