"""Hugging Face causal LMs that compute their training loss without materialising the logits.

``apply(model)`` makes a ``transformers`` causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``, ``Gemma2ForCausalLM``, ``GPT2LMHeadModel``, and any other model with the
same layout) compute the loss of a forward call that has ``labels`` with
``fusedce.linear_cross_entropy``, straight from the final hidden states and ``lm_head.weight``
(and bias): the ``(batch, sequence, vocabulary)`` logits are never held. Without ``labels``
(inference, ``generate()``) the model runs exactly as before and returns its logits.

How: the model's own forward still runs, so everything it does besides the head (its arguments,
caches, auxiliary losses, output class) stays as it is. Only for a call with ``labels``,

* ``lm_head`` returns a stand-in for the logits, an empty ``(..., 0)`` tensor that carries the
  hidden states it was given and records every operation the forward applies to it (scaling
  by numbers, as Cohere and Granite scale, and soft-capping, as Gemma 2 and Gemma 3 cap with
  ``cap * tanh(logits / cap)``, are recognised; anything else raises);
* ``model.loss_function``, handed that stand-in, computes what transformers' ``ForCausalLMLoss``
  computes (the shift by one with ``ignore_index`` padding, or the given ``shift_labels``;
  ``ignore_index``; 'mean', or 'sum' divided by ``num_items_in_batch`` when that is given) with
  ``linear_cross_entropy`` on the hidden states the forward kept (after ``logits_to_keep``);
* the output's ``logits`` is None.

The standard layout this needs: an ``lm_head`` that is a plain ``torch.nn.Linear`` with
``config.vocab_size`` outputs, ``loss_function`` resolving to ``ForCausalLMLoss``, and a forward
that takes ``labels`` and passes ``lm_head``'s output to ``self.loss_function``. ``apply`` checks
the first three and names what is missing; a forward that computes its loss some other way is
caught at its first call with labels.

The model and its ``lm_head`` get subclasses of their own classes (same names, so ``repr``,
``isinstance`` and ``save_pretrained``'s ``architectures`` are unchanged; ``copy.deepcopy``
works); ``remove(model)`` restores the original classes. The loss is float32 as the stock one
is, for a half-precision model too (``upcast_linear_cross_entropy``). A model pickled whole
(``torch.save(model)``) must be ``remove``d first: its class is not importable by name.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..linear.functional import upcast_linear_cross_entropy

__all__ = ["Applied", "apply", "remove"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "fusedce.integrations.transformers needs the transformers package: pip install fusedce[hf]"
        ) from error
    return transformers


def _stock_loss() -> Callable[..., Tensor]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


# --------------------------------------------------------------------------------------------
# The call in progress, and the logits' stand-in
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One forward call with labels: its model, whose lm_head defers, and how often the loss
    consumed the stand-in."""

    model: nn.Module
    lm_head: nn.Module
    consumed: int = 0


# The forward call with labels that is running in this thread or task (forward calls nest, as
# when a model holds another, so each lm_head checks that the call is its own).
_CALL: ContextVar[_Call | None] = ContextVar("fusedce_transformers_call", default=None)

# Operations the forward may apply to the logits, by the name of torch's function, and the
# step each is recorded as. Gemma 2's soft-capping is div, tanh, mul with the same number.
_STEPS = {"div": "div", "div_": "div", "true_divide": "div", "divide": "div", "__truediv__": "div",
          "__itruediv__": "div", "mul": "mul", "mul_": "mul", "multiply": "mul", "__mul__": "mul",
          "__rmul__": "mul", "__imul__": "mul", "tanh": "tanh", "tanh_": "tanh"}


class _DeferredLogits(Tensor):
    """An empty ``(..., 0)`` tensor standing in for the logits ``lm_head(hidden)``.

    It carries ``hidden`` and the call, and records each operation the forward applies to it
    (as ``(step, number)`` pairs in ``steps``), so the loss can apply them to the real logits
    (``_epilogue``) or refuse. Operations on it cost nothing: it has no elements.
    """

    _fusedce_hidden: Tensor
    _fusedce_call: _Call
    _fusedce_steps: tuple[tuple[str, Any], ...]

    @staticmethod
    def make(hidden: Tensor, lm_head: nn.Linear, call: _Call) -> _DeferredLogits:
        empty = hidden.new_empty((*hidden.shape[:-1], 0), dtype=lm_head.weight.dtype)
        stand_in = empty.as_subclass(_DeferredLogits)
        stand_in._fusedce_hidden, stand_in._fusedce_call, stand_in._fusedce_steps = hidden, call, ()
        return stand_in

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if func in torch.overrides.get_default_nowrap_functions() or not isinstance(result, Tensor):
            return result
        source = next((a for a in args if isinstance(a, _DeferredLogits)), None)
        if source is None:  # a tensor derived from the stand-in through a keyword argument only
            return result
        name = getattr(func, "__name__", repr(func))
        in_place = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
        if result is source and not in_place:  # an identity (.contiguous(), .float() on float32)
            return result
        steps = (*source._fusedce_steps, _step(name, args, kwargs))
        if result is source:
            source._fusedce_steps = steps
            return source
        derived = result.as_subclass(_DeferredLogits)
        derived._fusedce_hidden, derived._fusedce_call, derived._fusedce_steps = (
            source._fusedce_hidden, source._fusedce_call, steps)
        return derived


def _step(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    """``(step, number)`` for a recognised operation with one real number; ``(name, None)``
    for anything else (which the loss then refuses)."""
    step = _STEPS.get(name)
    others = [a for a in args if not isinstance(a, _DeferredLogits)]
    if step == "tanh" and not others and not kwargs:
        return ("tanh", None)
    if step in ("div", "mul") and not kwargs and len(others) == 1:
        number = others[0]
        if isinstance(number, numbers.Real) and not isinstance(number, bool):
            return (step, float(number))
    return (name, None)


def _epilogue(steps: tuple[tuple[str, Any], ...], model: nn.Module) -> tuple[float, float | None]:
    """What the forward did to the logits, as ``(scale, cap)`` for ``linear_cross_entropy``:
    the logits the loss reads are ``cap * tanh(scale * raw / cap)``, or ``scale * raw`` when
    ``cap`` is None.

    Recognised: multiplications and divisions by numbers (Cohere's ``logit_scale``, Granite's
    ``logits_scaling``), then optionally a tanh and more of them: ``p * tanh(s * raw)`` is
    ``cap * tanh(scale * raw / cap)`` with ``cap = p`` and ``scale = s * p``. Gemma 2's
    soft-capping (``div(c), tanh, mul(c)``) gives ``cap = c`` and ``scale = 1`` exactly, so its
    logits are capped op by op as the model caps them. Anything else raises, naming what the
    forward did."""
    factors = [[1.0, 1.0], [1.0, 1.0]]  # (numerator, denominator) before and after the tanh
    tanh = False
    for name, number in steps:
        if name == "tanh" and not tanh:
            tanh = True
        elif name in ("mul", "div") and number is not None and (name == "mul" or number != 0):
            factors[tanh][name == "div"] *= number
        else:
            break
    else:
        (s_num, s_den), (p_num, p_den) = factors
        cap = p_num / p_den if tanh else None
        scale = s_num / s_den if cap is None else s_num * cap / s_den
        if math.isfinite(scale) and (cap is None or (math.isfinite(cap) and cap > 0)):
            return scale, cap
    applied = ", ".join(name if number is None else f"{name}({number:g})" for name, number in steps)
    raise NotImplementedError(
        f"fusedce.integrations.transformers: {type(model).__name__}.forward applies [{applied}] to the logits "
        "before its loss; only scaling by numbers and soft-capping (p * tanh(s * logits), p > 0) can be computed "
        "without the logits. Call fusedce.integrations.transformers.remove(model) to use the stock loss."
    )


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _causal_lm_loss(
    logits: _DeferredLogits,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **_unused: Any,  # ForCausalLMLoss takes (and ignores) the forward's other keyword arguments too
) -> Tensor:
    """transformers' ``ForCausalLMLoss``, step for step, on the hidden states and ``lm_head``'s
    parameters instead of the logits."""
    call = logits._fusedce_call
    call.consumed += 1
    head = call.lm_head
    assert isinstance(head, nn.Linear)
    if head.weight.shape[0] != vocab_size:
        raise ValueError(
            f"fusedce.integrations.transformers: lm_head has {head.weight.shape[0]} outputs but the loss was "
            f"asked for vocab_size={vocab_size}; the stock loss would reinterpret the logits' rows"
        )
    scale, cap = _epilogue(logits._fusedce_steps, call.model)
    hidden = logits._fusedce_hidden
    if shift_labels is None:
        # Shift so that tokens < n predict n; the last position predicts nothing.
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    target = shift_labels.view(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if scale != 1.0:  # (scale * x) @ W.T is scale * (x @ W.T), and costs N×H, not N×C
        rows = rows * scale
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # The stock loss upcasts the logits to float32 before cross_entropy; the fused kernels read
    # them in their dtype and accumulate in float32 anyway, and keep that float32 result here.
    loss = upcast_linear_cross_entropy(rows, head.weight, target, linear_bias=head.bias, reduction=reduction,
                                       ignore_index=ignore_index, logit_softcap=cap).float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _loss_function(model: nn.Module, stock: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``model.loss_function`` while fusedce is applied: the fused loss for the stand-in logits,
    the stock loss for real ones (a caller with logits of its own)."""
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def loss_function(*args: Any, **kwargs: Any) -> Tensor:
        bound = signature.bind(*args, **kwargs)
        logits = bound.arguments["logits"]
        if isinstance(logits, _DeferredLogits):
            return _causal_lm_loss(*args, **kwargs)
        call = _CALL.get()
        if call is not None and call.model is model:
            raise RuntimeError(
                f"fusedce.integrations.transformers: {type(model).__name__}.forward passed its loss function "
                "something derived from the logits that fusedce cannot follow (only soft-capping is); call "
                "fusedce.integrations.transformers.remove(model) to use the stock loss"
            )
        return stock(*args, **kwargs)

    return loss_function


# --------------------------------------------------------------------------------------------
# The classes the model and its lm_head are switched to
# --------------------------------------------------------------------------------------------


class _DeferringLinear(nn.Linear):
    """``lm_head`` while fusedce is applied: the logits' stand-in during its model's forward
    with labels, the usual ``linear`` otherwise."""

    def forward(self, input: Tensor) -> Tensor:
        call = _CALL.get()
        if call is None or call.lm_head is not self:
            return super().forward(input)
        return _DeferredLogits.make(input, self, call)


_DeferringLinear.__name__ = _DeferringLinear.__qualname__ = "Linear"  # repr(model) stays the same

_FUSED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the model's class, with the same name, whose forward defers the logits
    when it is given labels and whose ``loss_function`` computes the loss from the stand-in."""
    if cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls]
    stock_forward = cls.forward
    signature = inspect.signature(stock_forward)
    stock_loss_property = inspect.getattr_static(cls, "loss_function")

    @functools.wraps(stock_forward)  # generate() reads the signature (logits_to_keep, ...)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            labels = signature.bind(self, *args, **kwargs).arguments.get("labels")
        except TypeError:  # let the stock forward raise its own error
            labels = None
        if labels is None:
            return stock_forward(self, *args, **kwargs)
        call = _Call(self, self.lm_head)
        token = _CALL.set(call)
        try:
            output = stock_forward(self, *args, **kwargs)
        finally:
            _CALL.reset(token)
        if not call.consumed:
            raise RuntimeError(
                f"fusedce.integrations.transformers: {cls.__name__}.forward was given labels but did not pass "
                "lm_head's output to self.loss_function, so fusedce cannot compute its loss; call "
                "fusedce.integrations.transformers.remove(model) to use the stock forward"
            )
        return _without_logits(output)

    def loss_function(self: Any) -> Callable[..., Tensor]:
        return _loss_function(self, stock_loss_property.__get__(self, type(self)))

    def set_loss_function(self: Any, value: Callable[..., Tensor]) -> None:
        stock_loss_property.__set__(self, value)

    namespace = {
        "forward": forward,
        "loss_function": property(loss_function, set_loss_function),
        "_fusedce_stock_class": cls,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    fused = type(cls.__name__, (cls,), namespace)
    _FUSED_CLASSES[cls] = fused
    return fused


def _without_logits(output: Any) -> Any:
    """The forward's output with the logits' stand-in taken out: ``logits`` is None (a tuple
    output, as from ``return_dict=False``, leaves it out as it leaves out every None)."""
    if isinstance(output, tuple):
        return type(output)(v for v in output if not isinstance(v, _DeferredLogits))
    if hasattr(output, "items"):  # transformers' ModelOutput
        return type(output)(**{k: v for k, v in output.items() if not isinstance(v, _DeferredLogits)})
    return output


# --------------------------------------------------------------------------------------------
# The public calls
# --------------------------------------------------------------------------------------------


def _check_layout(model: nn.Module) -> None:
    """Raise, naming everything missing, unless ``model`` has the standard causal-LM layout."""
    transformers = _transformers()
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"fusedce.integrations.transformers.apply expects a transformers PreTrainedModel, got {name}")
    missing = []
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        missing.append("an `lm_head` submodule")
    elif type(head) is not nn.Linear:
        missing.append(f"an `lm_head` that is a plain torch.nn.Linear (it is a {type(head).__name__})")
    elif head.out_features != getattr(model.config, "vocab_size", None):
        missing.append(f"an `lm_head` with config.vocab_size outputs (it has {head.out_features})")
    if "labels" not in inspect.signature(model.forward).parameters:
        missing.append("a forward that takes `labels`")
    stock = getattr(model, "loss_function", None)
    if stock is not _stock_loss():
        found = getattr(stock, "__name__", repr(stock))
        missing.append(f"`loss_function` resolving to transformers' ForCausalLMLoss (it is {found})")
    if missing:
        raise ValueError(
            f"fusedce.integrations.transformers.apply: {name} does not have the standard causal-LM layout; "
            "it lacks " + "; ".join(missing)
        )


class Applied:
    """What ``apply`` returns: a context manager that ``remove``s fusedce from the model on
    exit (``with apply(model): train(model)``); ignore it to keep fusedce applied."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def remove(self) -> None:
        remove(self.model)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply(model: nn.Module) -> Applied:
    """Make ``model`` (a transformers causal LM) compute its loss with
    ``fusedce.linear_cross_entropy`` whenever it is called with ``labels``, without the logits.

    The loss and gradients are those of the stock ``ForCausalLMLoss`` (up to the order of the
    matmuls' additions); the output's ``logits`` is None for such calls. Calls without labels are
    unchanged. Raises ``ValueError`` naming what is missing when the model does not have the
    standard layout (module docstring), and ``RuntimeError`` when fusedce is already applied.
    Not thread-safe against a concurrent ``apply``/``remove`` of the same model.
    """
    if hasattr(type(model), "_fusedce_stock_class"):
        raise RuntimeError(f"fusedce.integrations.transformers is already applied to this {type(model).__name__}")
    _check_layout(model)
    model.__class__ = _fused_class(type(model))
    model.lm_head.__class__ = _DeferringLinear
    return Applied(model)


def remove(model: nn.Module) -> None:
    """Undo ``apply``: the model and its ``lm_head`` get their original classes back."""
    stock = getattr(type(model), "_fusedce_stock_class", None)
    if stock is None:
        raise ValueError(f"fusedce.integrations.transformers is not applied to this {type(model).__name__}")
    model.__class__ = stock
    head = getattr(model, "lm_head", None)
    if type(head) is _DeferringLinear:
        model.lm_head.__class__ = nn.Linear
