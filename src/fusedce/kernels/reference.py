"""Pure-PyTorch kernels: the executable specification of every fused op.

Every backend (``cpu``, ``triton``) implements exactly these functions with exactly these
signatures, and the parity suite checks each of them against torch. This module is also the
fallback on any device, and the double-backward path: every function here is written with
differentiable torch ops, so autograd can differentiate through it.

Conventions shared by all backends
----------------------------------
* ``x`` is the input in canonical form ``(outer, C, inner)``, with any strides. Row ``r = (o, i)``
  has its classes at ``x[o, :, i]``.
* ``target`` (index path) is ``(outer, inner)``, int64 or uint8, any strides.
* ``weight`` is ``None`` or a 1-D tensor of ``C`` elements in ``x``'s dtype.
* Per-row results (``loss``) are ``(outer, inner)`` in the accumulation dtype: float64 for
  float64 input, float32 otherwise.
* ``stats`` (what the cross-entropy forwards return for their backward) is one
  ``(outer, inner, 2)`` tensor in the accumulation dtype: ``stats[..., 0]`` is the row max ``m``
  and ``stats[..., 1]`` is ``log Σ_c exp(x_c - m)``. The two are kept apart, never summed into a
  rounded ``lse = m + log Σ``: a log-probability is formed as ``(x - m) - log Σ``, as torch forms
  it, so the results do not lose digits when the logits share a large offset (at logits near
  60000 a rounded float32 lse is off by 2e-3).
* ``grad_loss`` is ``(outer, inner)`` in the accumulation dtype and may be broadcast (zero
  strides), e.g. the scalar upstream gradient of a 'mean' reduction expanded over the rows.
* Gradients with respect to ``x`` (and the softmax backwards' results) come back contiguous
  ``(outer, C, inner)`` in ``x``'s dtype, unless ``inplace`` asks for them to be written into
  ``x`` itself. The fake kernels promise these strides to torch.compile, which asserts them.
* An index target outside ``[0, C)`` that is not ``ignore_index`` raises
  ``IndexError("Target {t} is out of bounds.")`` in the forward, naming the first such target in
  row order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types and float32 accumulate in float32; float64 stays in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(x: Tensor) -> Tensor:
    return x.to(accumulation_dtype(x.dtype))


def row_stats(x: Tensor) -> Tensor:
    """The ``(outer, inner, 2)`` stats of each row: its max ``m`` and ``log Σ_c exp(x_c - m)``.

    Unlike ``torch.logsumexp``, a row that is all ``-inf`` gives a NaN log-sum (``-inf - -inf``),
    and so does a row holding ``+inf`` or NaN. That is exactly what makes every derived quantity
    of such a row NaN, as torch's log_softmax does for it. With no classes, both are ``-inf``
    (the max and the log of an empty sum).

    The max is detached: every derived quantity is invariant to it (shifting by any constant),
    so the double-backward path differentiates through the log-sum alone and never sees amax's
    subgradient at ties.

    The sum is ``1 + rest``, where ``rest`` holds the terms of every class but one maximal one
    (whose term is exactly 1), and the log-sum is ``log1p(rest)``. A confident row (one logit far
    above the others) has a tiny ``rest``: ``log(1 + rest)`` would round ``1 + rest`` to the
    dtype first and keep only ``rest``'s digits above ulp(1), which is all the loss of a target
    on that class is made of. Every backend forms it this way. The maximal class contributes
    ``expm1(x - m)``, 0 in value but with the derivative ``exp(x - m)`` of the term it stands for.
    """
    xf = _acc(x)
    if x.shape[1] == 0:
        return xf.new_full((x.shape[0], x.shape[2], 2), float("-inf"))
    row_max = xf.amax(dim=1, keepdim=True).detach()
    shifted = xf - row_max
    top = _onehot(shifted.argmax(dim=1), x.shape[1])
    rest = torch.where(top, torch.expm1(shifted), shifted.exp()).sum(dim=1, keepdim=True)
    # (m - m) is NaN for a max that is not finite: the NaN log-sum described above.
    logsum = rest.log1p() + (row_max - row_max)
    return torch.stack((row_max.squeeze(1), logsum.squeeze(1)), dim=-1)


def neg_log_prob(x: Tensor, stats: Tensor) -> Tensor:
    """``-log p = (m - x) + log Σ``, per element, in the accumulation dtype."""
    return (stats[..., 0].unsqueeze(1) - _acc(x)) + stats[..., 1].unsqueeze(1)


def log_prob(x: Tensor, stats: Tensor) -> Tensor:
    """``log p = (x - m) - log Σ``, torch's order of operations."""
    return (_acc(x) - stats[..., 0].unsqueeze(1)) - stats[..., 1].unsqueeze(1)


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise torch's IndexError for the first target outside [0, C) that is not ignored.

    This reads the targets on the host, so only backends whose tensors are on the host call it.
    """
    target = target.long()  # compared as int64: a uint8 target of 156 is not ignore_index -100
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = target.reshape(-1)[bad.reshape(-1)][0]
        raise IndexError(f"Target {int(first)} is out of bounds.")


def _gather_targets(
    x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the mask of non-ignored rows, the safe class index, and the target's weight.
    The target is compared as int64, as torch does (a uint8 156 would equal a wrapped -100)."""
    target = target.long()
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    w_target = (
        torch.ones_like(safe, dtype=accumulation_dtype(x.dtype))
        if weight is None
        else _weight_of(weight, safe)
    )
    return valid, safe, w_target


def _weight_of(weight: Tensor, index: Tensor) -> Tensor:
    """``weight[index]`` in the accumulation dtype. With no classes there is no class 0 to stand in
    for an ignored row (and every row is ignored: ``check_targets`` lets no other target through),
    so the masked rows get 0."""
    if weight.numel() == 0:
        return torch.zeros_like(index, dtype=accumulation_dtype(weight.dtype))
    return _acc(weight)[index]


def _target_values(x: Tensor, index: Tensor) -> Tensor:
    """``x[o, index[o, i], i]`` in the accumulation dtype; 0 when there are no classes (C = 0,
    where every row is ignored and masked, as for ``_weight_of``)."""
    if x.shape[1] == 0:
        return torch.zeros_like(index, dtype=accumulation_dtype(x.dtype))
    return _acc(x.gather(1, index.unsqueeze(1)).squeeze(1))


def _onehot(index: Tensor, num_classes: int) -> Tensor:
    """A (outer, C, inner) mask of the target classes. A comparison rather than a scatter, so
    that it has a vmap batching rule and is differentiable-friendly."""
    classes = torch.arange(num_classes, device=index.device).view(1, -1, 1)
    return classes == index.unsqueeze(1)


def _class_weights(x: Tensor, weight: Tensor | None) -> Tensor:
    """The weight as a (1, C, 1) accumulation-dtype tensor (ones when there is none)."""
    if weight is None:
        return torch.ones(1, x.shape[1], 1, dtype=accumulation_dtype(x.dtype), device=x.device)
    return _acc(weight).view(1, -1, 1)


# --------------------------------------------------------------------------------------------
# cross_entropy, index targets
# --------------------------------------------------------------------------------------------


def ce_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    """Per-row loss and the row stats.

    ``loss = (1-ε)·w[t]·(-log p_t) + (ε/C)·Σ_c w_c·(-log p_c)`` for a non-ignored row, and 0 for
    an ignored one (torch masks the row's loss, so an ignored NaN row still gives 0), with
    ``-log p_c = (m - x_c) + log Σ`` term by term.
    """
    num_classes = x.shape[1]
    check_targets(target, num_classes, ignore_index)
    stats = row_stats(x)
    valid, safe, w_target = _gather_targets(x, target, weight, ignore_index)
    x_target = _target_values(x, safe)
    loss = w_target * ((stats[..., 0] - x_target) + stats[..., 1])
    if smoothing > 0 and num_classes > 0:  # with no classes, no term (functional: torch's ε/0)
        smooth = (_class_weights(x, weight) * neg_log_prob(x, stats)).sum(dim=1)
        loss = (1 - smoothing) * loss + (smoothing / num_classes) * smooth
    return torch.where(valid, loss, 0), stats


def ce_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    inplace: bool,
) -> Tensor:
    """``grad_c = g·[(1-ε)·w[t]·(p_c - δ_ct) + (ε/C)·(W·p_c - w_c)]`` with ``W = Σ_c w_c``.

    ``g`` is zero on ignored rows. It multiplies the bracket rather than replacing it, so a NaN
    row that is ignored still has a NaN gradient, as in torch.
    """
    num_classes = x.shape[1]
    valid, safe, w_target = _gather_targets(x, target, weight, ignore_index)
    g = torch.where(valid, grad_loss, 0)
    eps = max(smoothing, 0.0)
    w = _class_weights(x, weight)
    prob = log_prob(x, stats).exp()
    target_coef = (1 - eps) * w_target  # weight of the one-hot part, per row
    smooth_coef = eps / num_classes if eps > 0 and num_classes > 0 else 0.0
    prob_coef = target_coef + smooth_coef * w.sum()
    grad = prob_coef.unsqueeze(1) * prob - smooth_coef * w
    grad = (grad - target_coef.unsqueeze(1) * _onehot(safe, num_classes)) * g.unsqueeze(1)
    if inplace:
        return x.copy_(grad)
    return grad.to(x.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# cross_entropy, index targets, with the LLM extras: z-loss and logit soft-capping.
# ``softcap`` is 0.0 for none (the ops take a plain float); ``z_loss`` is 0.0 for none.
# --------------------------------------------------------------------------------------------


def softcapped(x: Tensor, softcap: float) -> Tensor:
    """``cap·tanh(x / cap)`` in the accumulation dtype; ``x`` itself (accumulated) for ``cap = 0``."""
    xf = _acc(x)
    return softcap * torch.tanh(xf / softcap) if softcap else xf


def ce_extras_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[Tensor, Tensor]:
    """``ce_forward`` of the capped logits ``x' = cap·tanh(x/cap)``, plus ``z·lse²`` on each
    non-ignored row, unweighted (``lse = m + log Σ`` of ``x'``). The stats are those of ``x'``."""
    xc = softcapped(x, softcap)
    loss, stats = ce_forward(xc, target, weight, ignore_index, smoothing)
    if z_loss:
        lse = stats[..., 0] + stats[..., 1]
        loss = loss + torch.where(target.long() != ignore_index, z_loss * lse * lse, 0)
    return loss, stats


def ce_extras_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float,
    inplace: bool,
) -> Tensor:
    """``ce_backward``'s bracket at ``x'``, with ``2z·lse`` added to the coefficient of ``p_c``
    (``∂ z·lse² / ∂x'_c = 2z·lse·p_c``), times the chain factor ``1 - tanh²(x/cap)`` when capped."""
    num_classes = x.shape[1]
    xc = softcapped(x, softcap)
    valid, safe, w_target = _gather_targets(x, target, weight, ignore_index)
    g = torch.where(valid, grad_loss, 0)
    eps = max(smoothing, 0.0)
    w = _class_weights(x, weight)
    prob = log_prob(xc, stats).exp()
    target_coef = (1 - eps) * w_target
    smooth_coef = eps / num_classes if eps > 0 else 0.0
    prob_coef = target_coef + smooth_coef * w.sum()
    if z_loss:
        prob_coef = prob_coef + 2 * z_loss * (stats[..., 0] + stats[..., 1])
    grad = prob_coef.unsqueeze(1) * prob - smooth_coef * w
    grad = (grad - target_coef.unsqueeze(1) * _onehot(safe, num_classes)) * g.unsqueeze(1)
    if softcap:
        grad = grad * (1 - torch.tanh(_acc(x) / softcap) ** 2)
    if inplace:
        return x.copy_(grad)
    return grad.to(x.dtype)


def ce_extras_jvp(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float,
    x_tangent: Tensor,
) -> Tensor:
    """``Σ_c ∂loss/∂x_c · dx_c``, per row."""
    ones = torch.ones_like(stats[..., 0])
    args = (ignore_index, smoothing, z_loss, softcap, False)
    jacobian = ce_extras_backward(ones, x, target, weight, stats, *args)
    return (_acc(jacobian) * _acc(x_tangent)).sum(dim=1)


# --------------------------------------------------------------------------------------------
# cross_entropy, probability targets (x, target and weight share one dtype: the caller promotes)
# --------------------------------------------------------------------------------------------


def smoothed_target(target: Tensor, smoothing: float) -> Tensor:
    """``t' = t·(1-ε) + ε/C`` for ``ε > 0``, in the accumulation dtype."""
    if smoothing > 0 and target.shape[1] > 0:
        return _acc(target) * (1 - smoothing) + smoothing / target.shape[1]
    return _acc(target)


def ce_prob_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, smoothing: float
) -> tuple[Tensor, Tensor]:
    """``loss = Σ_c w_c·t'_c·((m - x_c) + log Σ)``, term by term: no ``lse·Σt - Σt·x``, which
    cancels when the loss is small. No masking, and a 0 target at a -inf logit is NaN."""
    stats = row_stats(x)
    wt = _class_weights(x, weight) * _acc(smoothed_target(target, smoothing))
    return (wt * neg_log_prob(x, stats)).sum(1), stats


def ce_prob_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    smoothing: float,
    inplace: bool,
) -> Tensor:
    """``grad_c = g·(S·p_c - w_c·t'_c)`` with ``S = Σ_k w_k·t'_k`` per row."""
    wt = _class_weights(x, weight) * _acc(smoothed_target(target, smoothing))
    prob = log_prob(x, stats).exp()
    grad = (wt.sum(1, keepdim=True) * prob - wt) * grad_loss.unsqueeze(1)
    if inplace:
        return x.copy_(grad)
    return grad.to(x.dtype).contiguous()


def ce_prob_target_grad(
    grad_loss: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, smoothing: float
) -> Tensor:
    """``∂loss/∂t_c = g·(1-ε)·w_c·(-log p_c)``, in x's dtype."""
    scale = 1 - smoothing if smoothing > 0 else 1.0
    neg_logprob = neg_log_prob(x, stats)
    grad = (scale * grad_loss).unsqueeze(1) * _class_weights(x, weight) * neg_logprob
    return grad.to(x.dtype)


def ce_prob_weight_grad(
    grad_loss: Tensor, x: Tensor, target: Tensor, stats: Tensor, smoothing: float
) -> Tensor:
    """``∂loss/∂w_c = Σ_rows g·t'_c·(-log p_c)``, in x's dtype."""
    neg_logprob = neg_log_prob(x, stats)
    per_row = grad_loss.unsqueeze(1) * _acc(smoothed_target(target, smoothing)) * neg_logprob
    return per_row.sum(dim=(0, 2)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# nll_loss
# --------------------------------------------------------------------------------------------


def nll_forward(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """``loss = -w[t]·x[t]`` for a non-ignored row, 0 for an ignored one."""
    check_targets(target, x.shape[1], ignore_index)
    return _picked_values(x, target, weight, ignore_index)


def _picked_values(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    valid, safe, w_target = _gather_targets(x, target, weight, ignore_index)
    return torch.where(valid, -w_target * _target_values(x, safe), 0)


def nll_backward(
    grad_loss: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    num_classes: int,
    dtype: torch.dtype,
) -> Tensor:
    """Scatter ``-g·w[t]`` into zeros of shape (outer, C, inner); ignored rows stay 0."""
    target = target.long()  # int64 comparison, as in _gather_targets
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    w_target = 1.0 if weight is None else _weight_of(weight, safe)
    g = torch.where(valid, -grad_loss * w_target, 0)
    return torch.where(_onehot(safe, num_classes), g.unsqueeze(1), 0).to(dtype)


# --------------------------------------------------------------------------------------------
# log_softmax and softmax (over dim 1 of the canonical form)
# --------------------------------------------------------------------------------------------


def log_softmax_forward(x: Tensor) -> Tensor:
    """``(x - m) - log Σ``: shift-invariant, as torch's."""
    return log_prob(x, row_stats(x)).to(x.dtype).contiguous()


def log_softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    """``grad - exp(out)·Σ_c grad``: at a -inf input the gradient is the upstream one, not 0."""
    g = _acc(grad_out)
    return (g - _acc(out).exp() * g.sum(dim=1, keepdim=True)).to(out.dtype).contiguous()


def softmax_forward(x: Tensor) -> Tensor:
    """``exp(x - m) / Σ exp(x - m)``, as torch forms it: the quotient keeps a few ulp of relative
    error however small the probability, where ``exp(log p)`` would add ``|log p|`` ulp."""
    xf = _acc(x)
    if x.shape[1] == 0:  # nothing to compute; a new tensor, never x itself (autograd saves it)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    shifted = (xf - xf.amax(dim=1, keepdim=True)).exp()
    return (shifted / shifted.sum(dim=1, keepdim=True)).to(x.dtype).contiguous()


def softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    """``out·(grad - Σ_c grad·out)``.

    float32 computes it in float64: where one class holds almost all the probability, the bracket
    is a difference of nearly equal numbers, and a float32 ``Σ`` (off by an ulp of the row's
    largest ``grad·out``) would be most of the result. The cpu backend compensates the sum
    instead, to the same effect. The half types' own rounding of ``out`` is far coarser than
    float32's sum, and float64 is what torch computes in."""
    if out.dtype == torch.float32:
        g, y = grad_out.double(), out.double()
    else:
        g, y = _acc(grad_out), _acc(out)
    return (y * (g - (g * y).sum(dim=1, keepdim=True))).to(out.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Forward-mode AD: the tangent of each op's output, given the tangents of its inputs.
# ``None`` tangents are inputs that carry none. These run only under forward AD, so they may
# materialise N×C temporaries.
# --------------------------------------------------------------------------------------------


def ce_jvp(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    smoothing: float,
    x_tangent: Tensor,
) -> Tensor:
    """``Σ_c ∂loss/∂x_c · dx_c``, per row."""
    ones = torch.ones_like(stats[..., 0])
    jacobian = ce_backward(ones, x, target, weight, stats, ignore_index, smoothing, False)
    return (_acc(jacobian) * _acc(x_tangent)).sum(dim=1)


def ce_prob_jvp(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    smoothing: float,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> Tensor:
    """The loss tangent from the tangents of x, the target and the weight."""
    x_tangent, target_tangent, weight_tangent = tangents
    ones = torch.ones_like(stats[..., 0])
    out = torch.zeros_like(stats[..., 0])
    if x_tangent is not None:
        jacobian = ce_prob_backward(ones, x, target, weight, stats, smoothing, False)
        out = out + (_acc(jacobian) * _acc(x_tangent)).sum(dim=1)
    if target_tangent is not None:
        jacobian = ce_prob_target_grad(ones, x, weight, stats, smoothing)
        out = out + (_acc(jacobian) * _acc(target_tangent)).sum(dim=1)
    if weight_tangent is not None:
        per_class = _acc(smoothed_target(target, smoothing)) * neg_log_prob(x, stats)
        out = out + (per_class * _acc(weight_tangent).view(1, -1, 1)).sum(dim=1)
    return out


def nll_jvp(target: Tensor, weight: Tensor | None, ignore_index: int, x_tangent: Tensor) -> Tensor:
    """nll is linear in x: its tangent is the loss of the tangent."""
    return _picked_values(x_tangent, target, weight, ignore_index)


def log_softmax_jvp(out: Tensor, x_tangent: Tensor) -> Tensor:
    """``dx - Σ_c p_c·dx_c``."""
    dx = _acc(x_tangent)
    return (dx - (_acc(out).exp() * dx).sum(dim=1, keepdim=True)).to(out.dtype)


def softmax_jvp(out: Tensor, x_tangent: Tensor) -> Tensor:
    """``p·(dx - Σ_c p_c·dx_c)``."""
    p, dx = _acc(out), _acc(x_tangent)
    return (p * (dx - (p * dx).sum(dim=1, keepdim=True))).to(out.dtype)
