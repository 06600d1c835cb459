"""Every validation torch performs, with torch's exception type and message.

The functions are called by ``functional`` in the order torch performs the same checks, so that
an input with several problems reports the same one as torch. The messages are torch 2.13's,
verbatim (including its typos); docs/semantics.md section 5 lists them.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    """c10's name for a dtype, as torch's messages print it ('Float', 'Long', ...)."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# --------------------------------------------------------------------------------------------
# Argument types: what torch's C++ argument parser rejects with TypeError.
# --------------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return "NoneType" if value is None else type(value).__name__


def check_tensor(fn: str, name: str, position: int, value: object, optional: bool = False) -> None:
    if isinstance(value, Tensor) or (optional and value is None):
        return
    raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be Tensor, not {_type_name(value)}")


def to_int_arg(fn: str, name: str, position: int, value: object) -> int:
    """An int argument: Python ints and 0-dim integer tensors pass; bool and float do not."""
    if type(value) is int and -(2**63) <= value < 2**63:  # the common case, checked cheaply
        return value
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be int, not {_type_name(value)}")
    if not -(2**63) <= int(value) < 2**63:
        raise ValueError("Overflow when unpacking long long")
    return int(value)


def loss_arguments(fn: str, input: object, target: object, weight: object, ignore_index: object) -> int:
    """The argument types both losses' C++ bindings check, in their order; returns ignore_index."""
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 3, weight, optional=True)
    return to_int_arg(fn, "ignore_index", 5, ignore_index)


def to_float_arg(fn: str, name: str, position: int, value: object) -> float:
    """A float argument: floats, ints, bools and 0-dim tensors pass."""
    if type(value) is float:  # the common case, checked cheaply
        return value
    if isinstance(value, Tensor) and value.dim() == 0:
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be float, not {_type_name(value)}")
    return float(value)


# --------------------------------------------------------------------------------------------
# softmax family
# --------------------------------------------------------------------------------------------


def wrap_dim(dim: int, ndim: int) -> int:
    """torch's maybe_wrap_dim: a 0-dim tensor has one valid dim, -1 or 0."""
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-size}, {size - 1}], but got {dim})"
        )
    return dim + size if dim < 0 else dim


def check_softmax_dtype(kernel: str, x: Tensor, dim: int) -> None:
    """torch's softmax kernels exist for floating dtypes only; the message names the kernel that
    would run (on CPU the 'lastdim' one when the reduced dim is the innermost)."""
    if not x.is_floating_point():
        if x.is_cuda:
            raise NotImplementedError(f'"host_softmax" not implemented for \'{scalar_type_name(x.dtype)}\'')
        last = dim == x.dim() - 1 or x.dim() == 0
        name = f"{kernel}_lastdim_kernel_impl" if last else f"{kernel}_kernel_impl"
        raise NotImplementedError(f'"{name}" not implemented for \'{scalar_type_name(x.dtype)}\'')


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


def is_probability_target(input: Tensor, target: Tensor) -> bool:
    """torch takes the probability path exactly when the shapes are equal."""
    return input.shape == target.shape


def check_label_smoothing(smoothing: float) -> float:
    """The smoothing to use: torch only checks (and uses) ε > 0, so a negative or NaN ε is 0."""
    if not smoothing > 0:
        return 0.0
    if smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {_format_double(smoothing)}")
    return smoothing


def check_smoothing_quirks(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str,
                           ignore_index: int | None = None) -> None:
    """Two failures of torch's label-smoothing path (index targets, ε > 0), reproduced because
    a drop-in must fail where torch fails:

    * it views the weight as ``(1, C, 1, ...)`` by its first dim, so a ``(1, C)`` weight that
      the spatial checks accepted fails the view;
    * its 'mean' with a weight gathers the weight by the targets its smoothing term keeps (those
      unequal to ``ignore_index`` compared in uint8, where -100 is 156), which gather refuses
      for a uint8 target when any is kept; with none kept it returns NaN (0 / 0).
    """
    if weight is not None and weight.dim() != 1:
        shape = [1] * input.dim()
        shape[0 if input.dim() == 1 else 1] = weight.shape[0]
        raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {weight.numel()}")
    if weight is not None and reduction == "mean" and target.dtype == torch.uint8 and _keeps_any(target, ignore_index):
        if ignore_index is not None and not input.is_cuda:
            # torch's NLL term runs before the gather: an out-of-range target raises its
            # IndexError first (on CPU; CUDA reports it in the kernel, after the gather).
            classes = input.shape[0 if input.dim() == 1 else 1]
            values = target.long().reshape(-1)
            bad = values[((values < 0) | (values >= classes)) & (values != ignore_index)]
            if bad.numel():
                raise IndexError(f"Target {int(bad[0])} is out of bounds.")
        raise RuntimeError("gather(): Expected dtype int32/int64 for index")


def _keeps_any(target: Tensor, ignore_index: int | None) -> bool:
    """Whether torch's smoothing term keeps any target: one unequal to ``ignore_index`` in the
    target's own dtype (``!=`` with a Python int wraps it, as torch's mask does)."""
    if ignore_index is None:
        return target.numel() > 0
    return bool((target != ignore_index).any())


def _format_double(value: float) -> str:
    """How c10 prints a double in a message: 1.5, 2, inf."""
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def check_probability_target(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> int:
    """The probability-path checks, in torch's order; returns the number of classes."""
    if not target.is_floating_point():
        raise RuntimeError(
            "Expected floating point type for target with class probabilities, "
            f"got {scalar_type_name(target.dtype)}"
        )
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if input.dim() == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions")
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != num_classes):
        raise RuntimeError(
            f"cross_entropy: weight tensor should be defined either for all {num_classes} classes or "
            f"no classes but got weight tensor of shape: {shape_str(weight)}"
        )
    return num_classes


# --------------------------------------------------------------------------------------------
# nll_loss (also the index path of cross_entropy, after its log_softmax)
# --------------------------------------------------------------------------------------------


def check_nll_shapes(input: Tensor, target: Tensor, weight: Tensor | None) -> None:
    """nll_loss_nd's shape checks, then those of the 1-D/2-D or the spatial kernel."""
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    if input.dim() != 1 and target.dim() >= 1 and input.shape[0] != target.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    if input.dim() != 1 and target.dim() == 0:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size (0).")
    if input.dim() <= 2:
        _check_nll_1d_2d(input, target, weight)
    elif input.dim() == 4:
        _check_nll_2d_spatial(input, target, weight)
    else:
        if target.shape[1:] != input.shape[2:]:
            expected = [input.shape[0], *input.shape[2:]]
            raise RuntimeError(f"Expected target size {expected}, got {shape_str(target)}")
        # The spatial kernel's own checks come after its target dtype check: check_nll_dtypes.


def _check_nll_1d_2d(input: Tensor, target: Tensor, weight: Tensor | None) -> None:
    if target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input.dim() == 1 and target.dim() == 1 and target.shape[0] != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    num_classes = input.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != num_classes):
        raise RuntimeError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes but "
            f"got weight tensor of shape: {shape_str(weight)}"
        )


def _check_nll_2d_spatial(input: Tensor, target: Tensor, weight: Tensor | None) -> None:
    # The CUDA kernel words two of these differently (its typo included).
    if target.dim() != 3:
        if input.is_cuda:
            raise RuntimeError(
                "only batches of spatial targets supported (3D tensors) but got targets of size: : "
                f"{shape_str(target)}"
            )
        raise RuntimeError(
            "only batches of spatial targets supported (3D tensors) but got targets of dimension: "
            f"{target.dim()}"
        )
    _check_spatial_weight(input, weight)
    if input.shape[0] != target.shape[0] or input.shape[2:] != target.shape[1:]:
        if input.is_cuda:
            raise RuntimeError(
                "input and target batch or spatial sizes don't match: "
                f"target {shape_str(target)}, input {shape_str(input)}"
            )
        # torch's message really has a space before the comma and no closing parenthesis.
        raise RuntimeError(f"size mismatch (got input: {shape_str(input)} , target: {shape_str(target)}")


def _check_empty_view_quirk(input: Tensor, target: Tensor) -> None:
    """For 3-D and 5-D+ input, nll_loss_nd views an empty input as (N, C, 0, 0) but a non-empty
    target as (N, 1, -1) before the spatial kernel's size check, which then fails: C = 0 with
    N > 0 and a non-empty spatial extent."""
    if input.numel() == 0 and target.numel() > 0:
        n, c = input.shape[0], input.shape[1]
        viewed_input, viewed_target = f"[{n}, {c}, 0, 0]", f"[{n}, 1, {target.numel() // n}]"
        if input.is_cuda:
            raise RuntimeError(
                f"input and target batch or spatial sizes don't match: target {viewed_target}, input {viewed_input}"
            )
        raise RuntimeError(f"size mismatch (got input: {viewed_input} , target: {viewed_target}")


def _check_spatial_weight(input: Tensor, weight: Tensor | None) -> None:
    # The spatial kernel only compares numel, so a (1, C) weight passes here (as in torch).
    if weight is not None and weight.numel() != input.shape[1]:
        raise RuntimeError("weight tensor should be defined either for all or no classes")


def check_weight_not_differentiable(input: Tensor, weight: Tensor | None) -> None:
    """The index path has no derivative for weight; torch refuses it in the forward."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        kernel = "nll_loss2d_forward" if input.dim() >= 3 else "nll_loss_forward"
        raise RuntimeError(
            f"The function '{kernel}' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )


def check_nll_dtypes(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> None:
    """Target dtype, then input dtype, then weight dtype, as the kernels check them."""
    if input.is_cuda:
        _check_nll_dtypes_cuda(input, target, reduction)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}"
        )
    spatial = input.dim() >= 3
    if spatial and input.dim() != 4:
        # 3-D and 5-D+ input reach the spatial kernel (viewed as 4-D) only now.
        _check_spatial_weight(input, weight)
        _check_empty_view_quirk(input, target)
    if not input.is_floating_point():
        kernel = "nll_loss2d_forward_out_frame" if spatial else "nll_loss_out_frame"
        raise NotImplementedError(f'"{kernel}" not implemented for \'{scalar_type_name(input.dtype)}\'')
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(
            f"expected scalar type {scalar_type_name(input.dtype)} but found {scalar_type_name(weight.dtype)}"
        )
    # Last: torch's spatial kernel reads the target as int64 once the input and weight dtypes
    # passed, except where it returns early: a reduced loss of an empty target (NaN for 'mean',
    # 0 for 'sum'). An input with no classes but some rows, (2, 0, 2, 3), still raises.
    if target.dtype == torch.uint8 and spatial and (reduction == "none" or target.numel() > 0):
        raise RuntimeError("expected scalar type Long but found Byte")


def _check_nll_dtypes_cuda(input: Tensor, target: Tensor, reduction: str) -> None:
    """torch's CUDA kernels have no explicit target check: the dtype dispatch of the kernel that
    would run refuses the target (1-D and 2-D input), or the spatial kernel's typed access does."""
    if input.dim() >= 3:
        if target.dtype != torch.int64:
            raise RuntimeError(f"expected scalar type Long but found {scalar_type_name(target.dtype)}")
        if not input.is_floating_point():
            name = scalar_type_name(input.dtype)
            raise NotImplementedError(f'"nll_loss2d_forward_kernel" not implemented for \'{name}\'')
        return
    if input.dim() == 2 and reduction == "none":
        kernel = "nll_loss_forward_no_reduce_cuda_kernel"
    else:
        kernel = f"nll_loss_forward_reduce_cuda_kernel_{input.dim()}d"
    if not input.is_floating_point():
        raise NotImplementedError(f'"{kernel}" not implemented for \'{scalar_type_name(input.dtype)}\'')
    if target.dtype not in (torch.int64, torch.uint8):
        raise NotImplementedError(f'"{kernel}_index" not implemented for \'{scalar_type_name(target.dtype)}\'')


def check_nll(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> None:
    """Every check of nll_loss (and of cross_entropy's index path after its log_softmax)."""
    check_nll_shapes(input, target, weight)
    check_weight_not_differentiable(input, weight)
    check_nll_dtypes(input, target, weight, reduction)
