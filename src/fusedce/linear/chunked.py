"""The chunk loops: the linear head and the fused loss, one block of rows at a time.

Everything here works on plain tensors in the linear path's canonical form:

* ``x2`` is the hidden state as ``(N, H)`` (an unbatched input is one row), any strides;
* ``w2`` is the linear weight as ``(C*D, H)`` and ``b1`` its bias as ``(C*D,)`` or None, where
  ``D`` is the product of the K-dim extents (1 without them);
* the logits of a block of ``n`` rows are ``x2[rows] @ w2.T + b1``, viewed as the fused kernels'
  canonical ``(n, C, D)``, so a block is a slice along the kernels' ``outer`` dim;
* ``target`` is the index target as ``(N, D)``, or the probability target as ``(N, C, D)``
  already in the loss dtype (see ``LossSpec.dtype``), as are the class weights.

The logits of one block live in ONE buffer that every block reuses: the matmul writes into it
(``out=``), the fused forward reads it, the fused backward writes the gradient of the logits
over it, and the two gradient matmuls read it. Nothing of size ``N×C`` is ever allocated.

Rows whose targets are all ``ignore_index`` are left out of the blocks when that is exact (see
``rows``): their loss, stats and input gradient are zeros, and blocks gather the other rows.

The per-row statistics the fused forward returns (``stats``) are opaque here: they are only
sliced and concatenated along their first (row) dim and handed back to the fused backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .._ops import ops
from ..kernels import backend_for, reference
from ..kernels.reference import accumulation_dtype
from . import matmul
from .rows import Selection, computed_rows, selections, spread, take

# One block's logits buffer stays about this large: big enough that the block's matmuls run at
# full speed, small enough to be a rounding error next to the (N, C) logits it replaces.
_BLOCK_BYTES = {"cuda": 96 << 20}
_DEFAULT_BLOCK_BYTES = 16 << 20
# Half-precision logits on CPU: each block's weight gradient is widened into the float32 sum
# (``weight_grad_dtype``), a pass over the whole (C, H) gradient per block, so fewer, larger
# blocks pay off: `python -m fusedce bench --workload lmhead` (bf16, 4096 x 512 x 32000, 2-core
# EPYC) went from 589.8 ms with 262-row blocks to 509.6 ms with these 64 MB ones (1048 rows,
# since rounded to 1024, below).
_HALF_CPU_BLOCK_BYTES = 64 << 20
# On CUDA a block's row count is a multiple of the matmul tile's rows (cuBLAS's are 64 to 256), so
# that no tile of the logits matmul is mostly empty, and at least _CUDA_MIN_ROWS: the weight
# gradient's ``addmm_`` reads and writes all of (C, H) once per block, and its depth is the block's
# rows. With 256 or more it stays bound by arithmetic, not by that traffic (an H100/H200 does about
# 165 bf16 FLOP per byte of HBM traffic; ``addmm_`` over k rows does k/2 per byte of bf16 C).
_CUDA_ROW_MULTIPLE = 128
_CUDA_MIN_ROWS = 256
# On CPU a multiple of 64 rows: oneDNN's bf16 matmuls ran the 1048-row blocks of the budget below
# slower than 1024-row ones (`python -m fusedce bench --workload linear_cross_entropy/lmhead/bf16
# --mode full --provider fusedce --torch-env thp --no-memory`, twice each: 548.1 and 549.6 ms
# with 1048 rows, 518.6 and 516.3 with 1024).
_CPU_ROW_MULTIPLE = 64


@dataclass(frozen=True)
class LossSpec:
    """The loss arguments every loop needs, fixed for one call."""

    num_classes: int  # C; the logits' second dim
    inner: int  # D; the product of the K-dim extents (1 without them)
    prob: bool  # probability target (else index target)
    ignore_index: int
    smoothing: float
    dtype: torch.dtype  # the loss's dtype: the logits' one, promoted with a probability target's
    chunk: int  # rows per block
    softcap: float | None = None  # the loss reads cap * tanh(raw / cap) of the raw logits (None: raw)


def block_rows(rows: int, width: int, dtype: torch.dtype, device: torch.device, requested: int | None) -> int:
    """Rows per block: ``requested`` when given (``options.batch_chunk_size``), else as many as
    keep one block's logits near the device's budget."""
    if requested is not None:
        return max(1, min(requested, rows))
    budget = _BLOCK_BYTES.get(device.type, _DEFAULT_BLOCK_BYTES)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        budget = _HALF_CPU_BLOCK_BYTES
    per_row = max(width, 1) * torch.empty((), dtype=dtype).element_size()
    chunk = budget // per_row
    if device.type == "cuda":
        chunk = max(_CUDA_MIN_ROWS, chunk // _CUDA_ROW_MULTIPLE * _CUDA_ROW_MULTIPLE)
    elif chunk >= _CPU_ROW_MULTIPLE:
        chunk = chunk // _CPU_ROW_MULTIPLE * _CPU_ROW_MULTIPLE
    return max(1, min(chunk, rows))


def _blocks(rows: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, chunk):
        yield start, min(start + chunk, rows)


def _computed_rows(x2: Tensor, w2: Tensor, b1: Tensor | None, target: Tensor, spec: LossSpec) -> Tensor | None:
    return computed_rows(x2, w2, b1, target, spec.prob, spec.ignore_index)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> Tensor:
    """An uninitialised tensor on ``like``'s device: on CPU from the C++ backend's output pool
    where it runs (kernels/cpu/output_pool.h), so that a training step's blocks and sums reuse the
    last step's pages instead of faulting in fresh zeroed ones (about 200 MB a step at the bf16
    lmhead shape); elsewhere ``new_empty`` (CUDA's caching allocator does the same)."""
    if like.device.type == "cpu":
        pooled = getattr(backend_for(like.device), "pooled_empty", None)
        if pooled is not None:
            return pooled(tuple(shape), dtype)
    return like.new_empty(shape, dtype=dtype)


class _Block:
    """The reused logits buffer (and, when a probability target promotes the loss dtype, a
    second one in that dtype; with a soft cap, a third that keeps ``tanh(raw / cap)`` for the
    cap's derivative once the gradient has overwritten the logits)."""

    def __init__(self, x2: Tensor, w2: Tensor, spec: LossSpec) -> None:
        rows = min(spec.chunk, x2.shape[0])
        shape = (rows, w2.shape[0])
        # Through oneDNN (see ``matmul``) each block's logits come back as a new tensor (the op has
        # no ``out=``): the loops drop a block's before the next is made, so one is alive at a time.
        self.onednn = matmul.onednn(x2[:1], w2)
        self.buffer = None if self.onednn else scratch(shape, w2.dtype, x2)
        self.promoted = None if spec.dtype == w2.dtype else scratch(shape, spec.dtype, x2)
        self.num_classes, self.inner = spec.num_classes, spec.inner
        self.softcap = spec.softcap
        self.tanh = None if spec.softcap is None else scratch(shape, w2.dtype, x2)

    def logits(self, x_rows: Tensor, w2: Tensor, b1: Tensor | None) -> tuple[Tensor, Tensor]:
        """The block's logits as (n, C*D) in the matmul dtype, and as the kernels' (n, C, D)
        in the loss dtype (the same storage unless the dtypes differ)."""
        if self.buffer is None:
            out = matmul.linear(x_rows, w2, b1)
        else:
            out = self.buffer[: x_rows.shape[0]]
            if b1 is None:
                torch.mm(x_rows, w2.t(), out=out)
            else:
                torch.addmm(b1, x_rows, w2.t(), out=out)
        if self.tanh is not None:
            # cap * tanh(raw / cap), op by op in the matmul dtype as the reference formula rounds.
            assert self.softcap is not None
            tanh = self.tanh[: x_rows.shape[0]]
            torch.div(out, self.softcap, out=tanh).tanh_()
            torch.mul(tanh, self.softcap, out=out)
        canonical = out
        if self.promoted is not None:
            canonical = self.promoted[: x_rows.shape[0]]
            canonical.copy_(out)
        return out, canonical.view(out.shape[0], self.num_classes, self.inner)

    def gradient(self, flat: Tensor, canonical: Tensor) -> Tensor:
        """The logits gradient the fused backward wrote over ``canonical``, as (n, C*D) in the
        matmul dtype; with a soft cap, that of the raw logits (times ``1 - tanh²``; this uses up
        the kept ``tanh``)."""
        if self.promoted is not None:
            flat.copy_(canonical.view(flat.shape))
        if self.tanh is not None:
            tanh = self.tanh[: flat.shape[0]]
            flat.mul_(tanh.mul_(tanh).neg_().add_(1))
        return flat


def soft_cap(raw: Tensor, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """``(cap * tanh(raw / cap), tanh(raw / cap))``, differentiably; ``(raw, None)`` without a
    cap. The derivative of the capped logits with respect to ``raw`` is ``1 - tanh²``."""
    if cap is None:
        return raw, None
    tanh = torch.tanh(raw / cap)
    return tanh * cap, tanh


def weight_grad_dtype(w2: Tensor) -> torch.dtype:
    """The dtype the weight and bias gradients accumulate in over the blocks.

    On CPU, float32 for half-precision weights: a bf16 running sum would round once per block,
    where torch rounds once. On CUDA, the weight's own dtype, as torch's chunked path does: each
    ``addmm_`` adds in float32 inside cuBLAS, and a float32 copy of an LM head's weight gradient
    would cost more memory than the blocks save.
    """
    return accumulation_dtype(w2.dtype) if w2.device.type == "cpu" else w2.dtype


# Rows of the float32 scratch that widens a half-precision block's weight gradient a slice at a
# time (see ``_Gradients._accumulate``): large enough for few slices (each op costs a thread
# sync, which hurts on a loaded machine: 4 slices at the CPU lmhead shape), small next to the
# float32 weight gradient of an LM head.
_WIDEN_BYTES = 16 << 20


def narrowed(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad.to(dtype)``: the float32 weight-gradient sum rounded back to the weight's half
    precision in one pass by the C++ backend where it runs (ATen's conversion took 19 ms of the
    bf16 lmhead step), else by ATen; both round to nearest even."""
    if grad.dtype == dtype:
        return grad
    narrow = getattr(backend_for(grad.device), "narrowed", None)
    if narrow is not None and grad.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16) \
            and grad.is_contiguous():
        return narrow(grad, dtype)
    return grad.to(dtype)


class _Gradients:
    """Accumulators for the gradients of the hidden state, the weight and the bias (the latter
    two in ``weight_grad_dtype``).

    The weight and bias gradients are not zero-filled up front: the first block writes them
    (``mm``/``copy_``), later blocks add to them, and only a call with no rows zeroes them. A
    zero fill of a fresh LM-head-sized buffer costs as much as a block's matmul (page faults).
    """

    def __init__(self, x2: Tensor, w2: Tensor, b1: Tensor | None, wanted: tuple[bool, bool, bool],
                 skipping: bool, chunk: int) -> None:
        want_x, want_w, want_b = wanted
        acc = weight_grad_dtype(w2)
        # Skipped rows' input gradient is zero; the computed ones land through a block scratch.
        self.x = scratch(tuple(x2.shape), x2.dtype, x2) if want_x else None
        if self.x is not None and skipping:
            self.x.zero_()
        self._x_block = None
        if want_x and skipping:
            self._x_block = scratch((min(chunk, x2.shape[0]), x2.shape[1]), x2.dtype, x2)
        self.w = scratch(tuple(w2.shape), acc, w2) if want_w else None
        self.b = torch.empty(w2.shape[0], dtype=acc, device=w2.device) if want_b and b1 is not None else None
        self._started = False
        # A reused scratch for one block's weight gradient when it cannot be added in place, and
        # a small float32 one to widen it through, a slice at a time.
        self._w_block = None if not want_w or acc == w2.dtype else scratch(tuple(w2.shape), w2.dtype, w2)
        self._widen: Tensor | None = None  # made on first use: the C++ pass needs none

    def add(self, rows: Selection, grad: Tensor, x_rows: Tensor, w2: Tensor) -> None:
        first, self._started = not self._started, True
        if self.x is not None:
            if matmul.onednn(grad, w2):
                grad_x = matmul.linear(grad, w2.t(), None)  # a block's (n, H): small
                if isinstance(rows, slice):
                    self.x[rows] = grad_x
                else:
                    self.x.index_copy_(0, rows, grad_x)
            elif isinstance(rows, slice):
                torch.mm(grad, w2, out=self.x[rows])
            else:
                assert self._x_block is not None
                out = self._x_block[: grad.shape[0]]
                torch.mm(grad, w2, out=out)
                self.x.index_copy_(0, rows, out)
        if self.w is not None:
            if self._w_block is None:  # same dtype: one gemm, straight into the accumulator
                if first:
                    torch.mm(grad.t(), x_rows, out=self.w)
                else:
                    self.w.addmm_(grad.t(), x_rows)
            else:
                torch.mm(grad.t(), x_rows, out=self._w_block)
                self._accumulate(self._w_block, first)
        if self.b is not None:
            if first:
                torch.sum(grad, 0, dtype=self.b.dtype, out=self.b)
            else:
                self.b.add_(grad.sum(0, dtype=self.b.dtype))

    def _accumulate(self, block: Tensor, first: bool) -> None:
        """``self.w (+)= block``: in one pass by the C++ backend's ``accumulate_widened_`` where it
        runs, else widening ``block`` to float32 a slice at a time (``add_`` of a bf16 tensor into
        a float32 one is an order of magnitude slower than ``copy_`` into float32 then a
        same-dtype ``add_``, and a whole float32 copy would cost memory)."""
        assert self.w is not None
        widen = getattr(backend_for(block.device), "accumulate_widened_", None)
        if widen is not None and block.is_contiguous() and self.w.is_contiguous():
            widen(self.w, block, first)
            return
        if self._widen is None:
            slice_rows = max(1, min(block.shape[0], _WIDEN_BYTES // max(1, block.shape[1] * 4)))
            self._widen = torch.empty((slice_rows, block.shape[1]), dtype=self.w.dtype, device=block.device)
        if first:
            self.w.copy_(block)
            return
        step = self._widen.shape[0]
        for lo in range(0, block.shape[0], step):
            hi = min(lo + step, block.shape[0])
            widened = self._widen[: hi - lo]
            widened.copy_(block[lo:hi])
            self.w[lo:hi].add_(widened)

    def finish(self) -> None:
        """Zero the weight and bias gradients when no block ran (no rows)."""
        if not self._started:
            for acc in (self.w, self.b):
                if acc is not None:
                    acc.zero_()


def _fused_forward(logits: Tensor, target: Tensor, weight: Tensor | None, spec: LossSpec) -> tuple[Tensor, Tensor]:
    if spec.prob:
        return ops.ce_prob_forward(logits, target, weight, spec.smoothing)
    return ops.ce_forward(logits, target, weight, spec.ignore_index, spec.smoothing)


def _fused_backward_(
    grad_rows: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, spec: LossSpec
) -> None:
    if spec.prob:
        ops.ce_prob_backward_(grad_rows, logits, target, weight, stats, spec.smoothing)
    else:
        ops.ce_backward_(grad_rows, logits, target, weight, stats, spec.ignore_index, spec.smoothing)


def forward(
    x2: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    spec: LossSpec,
    grad_rows: Tensor | None,
    wanted: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row losses ``(N, D)`` and stats; with ``grad_rows`` (the upstream gradient of each
    row's loss, ``(N, D)``), also the ``wanted`` gradients of (x2, w2, b1), from the same pass.
    The weight and bias gradients come back in ``weight_grad_dtype``."""
    kept = _computed_rows(x2, w2, b1, target, spec)
    block = _Block(x2, w2, spec)
    wanted = wanted if grad_rows is not None else (False, False, False)
    grads = _Gradients(x2, w2, b1, wanted, kept is not None, spec.chunk)
    losses, stats = [], []
    for rows in selections(x2.shape[0], spec.chunk, kept):
        x_rows, t = take(x2, rows), take(target, rows)
        flat, logits = block.logits(x_rows, w2, b1)
        loss, stat = _fused_forward(logits, t, weight, spec)
        losses.append(loss)
        stats.append(stat)
        if grad_rows is not None and any(wanted):
            _fused_backward_(take(grad_rows, rows), logits, t, weight, stat, spec)
            grads.add(rows, block.gradient(flat, logits), x_rows, w2)
        del flat, logits  # before the next block's logits exist (see ``_Block``)
    if not losses:  # no computed rows: the kernels' per-row shapes, from an empty block
        _, logits = block.logits(x2[:0], w2, b1)
        loss, stat = _fused_forward(logits, target[:0], weight, spec)
        losses, stats = [loss], [stat]
    grads.finish()
    total = x2.shape[0]
    return (spread(torch.cat(losses), kept, total), spread(torch.cat(stats), kept, total),
            grads.x, grads.w, grads.b)


def backward(
    grad_rows: Tensor,
    x2: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    spec: LossSpec,
    wanted: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Recompute each block's logits and return the ``wanted`` gradients of (x2, w2, b1, the
    probability target, the class weights). The weight and bias gradients are in
    ``weight_grad_dtype``; the target's in the loss dtype, the class weights' in its accumulation
    dtype."""
    kept = _computed_rows(x2, w2, b1, target, spec)  # the rows forward computed too
    block = _Block(x2, w2, spec)
    grads = _Gradients(x2, w2, b1, wanted[:3], kept is not None, spec.chunk)
    want_target, want_weight = wanted[3], wanted[4] and spec.prob
    grad_target = torch.empty(target.shape, dtype=spec.dtype, device=target.device) if want_target else None
    grad_weight = None
    if want_weight and weight is not None:
        grad_weight = torch.zeros(weight.shape, dtype=accumulation_dtype(spec.dtype), device=weight.device)
    for rows in selections(x2.shape[0], spec.chunk, kept):
        x_rows = take(x2, rows)
        flat, logits = block.logits(x_rows, w2, b1)
        g, t, s = take(grad_rows, rows), take(target, rows), take(stats, rows)
        # The target and weight gradients read the logits, so they come before the in-place backward.
        if grad_target is not None:  # probability targets only, where no row is skipped
            assert isinstance(rows, slice)
            grad_target[rows] = reference.ce_prob_target_grad(g, logits, weight, s, spec.smoothing)
        if grad_weight is not None:
            grad_weight += reference.ce_prob_weight_grad(g, logits, t, s, spec.smoothing)
        if any(wanted[:3]):
            _fused_backward_(g, logits, t, weight, s, spec)
            grads.add(rows, block.gradient(flat, logits), x_rows, w2)
        del flat, logits  # before the next block's logits exist (see ``_Block``)
    grads.finish()
    return grads.x, grads.w, grads.b, grad_target, grad_weight


def loss_tangent(
    x2: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    spec: LossSpec,
    tangents: tuple[Tensor | None, ...],
) -> Tensor:
    """Forward-mode AD: the per-row loss tangent ``(N, D)`` from the tangents of (x2, w2, b1,
    target, weight), a block at a time (the logits' tangent is a block's size too)."""
    tx, tw, tb, tt, tc = tangents
    out = []
    # Rows forward skipped (see ``rows``) have no stats (zeros there): recompute their lse.
    kept = _computed_rows(x2, w2, b1, target, spec)
    skipped = None
    if kept is not None:
        skipped = torch.ones(x2.shape[0], dtype=torch.bool, device=x2.device)
        skipped[kept] = False
    for start, stop in _blocks(x2.shape[0], spec.chunk):
        x_rows = x2[start:stop]
        raw = torch.nn.functional.linear(x_rows, w2, b1)
        logits, tanh = soft_cap(raw, spec.softcap)
        logits = logits.to(spec.dtype).view(stop - start, spec.num_classes, spec.inner)
        dlogits = torch.zeros_like(logits)
        if tx is not None:
            dlogits = dlogits + (tx[start:stop] @ w2.t()).view_as(logits)
        if tw is not None:
            dlogits = dlogits + (x_rows @ tw.t()).view_as(logits)
        if tb is not None:
            dlogits = dlogits + tb.view(1, spec.num_classes, spec.inner)
        if tanh is not None:
            dlogits = dlogits * (1 - tanh * tanh).view_as(logits)
        s = stats[start:stop]
        if skipped is not None and bool(skipped[start:stop].any()):
            fresh = reference.row_stats(logits)  # skipped rows saved no stats: compute them here
            s = torch.where(skipped[start:stop].view(-1, *(1,) * (s.dim() - 1)), fresh.to(s.dtype), s)
        if spec.prob:
            t_rows = None if tt is None else tt[start:stop]
            out.append(reference.ce_prob_jvp(logits, target[start:stop], weight, s, spec.smoothing,
                                             (dlogits, t_rows, tc)))
        else:
            out.append(reference.ce_jvp(logits, target[start:stop], weight, s, spec.ignore_index,
                                        spec.smoothing, dlogits))
    if not out:
        return torch.zeros(stats.shape[:2], dtype=accumulation_dtype(spec.dtype), device=x2.device)
    return torch.cat(out)
