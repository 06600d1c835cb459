"""fusedce.integrations.transformers: Hugging Face causal LMs that train without their logits.

Tiny random models built in code (nothing downloaded): each family trains a few steps side by
side with the stock model, from the same weights on the same data, and must match its loss and
every parameter's gradient, with the loss options transformers' ForCausalLMLoss has. Skipped
when transformers is not installed (``pip install fusedce[hf]``).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from fusedce.integrations import transformers as integration  # noqa: E402
from fusedce.linear import ops as linear_ops  # noqa: E402

VOCAB, HIDDEN, BATCH, SEQ = 96, 32, 2, 12
# Gemma 2's cap, with weights initialised ten times larger than the default so that its logits
# (about 1 in scale, up to 5) reach the cap and tanh bends them: dropping the cap moves the loss
# by 0.7, far beyond the tolerance.
SOFTCAP = 1.0
_LLAMA_LIKE = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}

FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_LLAMA_LIKE)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **_LLAMA_LIKE, head_dim=8, final_logit_softcapping=SOFTCAP, initializer_range=0.2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}

# fp32 on both sides, the same weights and inputs: the two differ only in how the matmuls
# associate their sums (the fused loss runs the head's three matmuls a block of rows at a time;
# the weight gradient adds the blocks' products), sums of at most max(HIDDEN, BATCH*SEQ) = 32
# terms, about 32 * 2^-24 ≈ 2e-6 relative each, carried through two layers and three SGD steps.
# 2e-5 relative (and 1e-6 absolute, for entries that cancel to near zero) leaves that an order
# of magnitude of room; a wrong mask, shift, denominator or cap is off by 1e-2 or more.
RTOL, ATOL = 2e-5, 1e-6


def _pair(family: str) -> tuple[Any, Any]:
    """The stock model and a deep copy with fusedce applied: the same weights."""
    torch.manual_seed(0)
    stock = FAMILIES[family]()
    fused = copy.deepcopy(stock)
    integration.apply(fused)
    return stock, fused


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, torch.randint(0, SEQ, (3,), generator=generator)] = -100
    return ids, labels


def _call_kwargs(variant: str, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments of one training call for each of ForCausalLMLoss's options."""
    if variant == "labels":
        return {"labels": labels}
    if variant == "num_items_in_batch":
        # As the Trainer passes it under gradient accumulation: the count over several batches.
        return {"labels": labels, "num_items_in_batch": torch.tensor(3 * int((labels != -100).sum()))}
    if variant == "shift_labels":
        shifted = torch.roll(labels, -2, dims=1)  # pre-shifted labels win over the model's own shift
        shifted[:, -2:] = -100
        return {"labels": labels, "shift_labels": shifted}
    if variant == "logits_to_keep":
        keep = 5
        return {"labels": labels[:, -keep:], "logits_to_keep": keep}
    raise AssertionError(variant)


def _assert_gradients_match(stock: Any, fused: Any, what: str) -> None:
    for (name, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), f"{what}: {name}"
        if p.grad is not None:
            # An entry that cancels to near zero keeps the absolute error of its terms, which are
            # of the size of the tensor's largest entries: the floor scales with them.
            atol = max(ATOL, RTOL * float(p.grad.abs().max()))
            torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("variant", ["labels", "num_items_in_batch", "shift_labels", "logits_to_keep"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_matches_the_stock_model(family, variant):
    stock, fused = _pair(family)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (stock, fused)]
    ids, labels = _batch()
    kwargs = _call_kwargs(variant, ids, labels)
    for step in range(3):
        expected = stock(ids, **kwargs)
        actual = fused(ids, **kwargs)
        assert actual.logits is None  # never computed
        assert expected.loss.dtype == actual.loss.dtype == torch.float32
        torch.testing.assert_close(actual.loss, expected.loss, rtol=RTOL, atol=ATOL)
        for out, opt in zip((expected, actual), optimisers, strict=True):
            opt.zero_grad()
            out.loss.backward()
        _assert_gradients_match(stock, fused, f"{family}/{variant} step {step}")
        for opt in optimisers:
            opt.step()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_returns_the_stock_logits_and_generates_alike(family):
    stock, fused = _pair(family)
    ids, _ = _batch()
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, stock(ids).logits)
        assert torch.equal(fused(ids, logits_to_keep=1).logits, stock(ids, logits_to_keep=1).logits)
    attention = torch.ones_like(ids[:, :4])
    settings = {"max_new_tokens": 4, "do_sample": False, "attention_mask": attention, "pad_token_id": 0}
    assert torch.equal(fused.generate(ids[:, :4], **settings), stock.generate(ids[:, :4], **settings))


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_scaled_logits(family):
    """Cohere multiplies its logits by config.logit_scale, Granite divides them by
    config.logits_scaling: a scale the fused loss applies to the hidden states instead."""
    torch.manual_seed(0)
    if family == "cohere":
        stock = transformers.CohereForCausalLM(transformers.CohereConfig(**_LLAMA_LIKE, logit_scale=0.25))
    else:
        stock = transformers.GraniteForCausalLM(transformers.GraniteConfig(**_LLAMA_LIKE, logits_scaling=3.0))
    fused = copy.deepcopy(stock)
    integration.apply(fused)
    ids, labels = _batch()
    expected, actual = stock(ids, labels=labels).loss, fused(ids, labels=labels).loss
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    expected.backward()
    actual.backward()
    _assert_gradients_match(stock, fused, family)


def test_an_lm_head_with_a_bias():
    """The bias reaches the loss and gets its gradient (none of the five families has one)."""
    torch.manual_seed(0)
    stock = FAMILIES["llama"]()
    stock.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    fused = copy.deepcopy(stock)
    integration.apply(fused)
    ids, labels = _batch()
    expected, actual = stock(ids, labels=labels).loss, fused(ids, labels=labels).loss
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    expected.backward()
    actual.backward()
    _assert_gradients_match(stock, fused, "lm_head with a bias")
    assert fused.lm_head.bias.grad is not None


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bfloat16_loss_is_float32_as_stock(family):
    """A bfloat16 model: the stock loss upcasts the logits and returns float32, and so does the
    fused one (its kernels accumulate in float32), to float32's digits. The gradients agree to
    bfloat16's rounding (2^-8; Gemma 2's cap adds roundings of its own in the stock backward)."""
    stock, fused = _pair(family)
    stock.to(torch.bfloat16)
    fused.to(torch.bfloat16)
    ids, labels = _batch()
    expected, actual = stock(ids, labels=labels).loss, fused(ids, labels=labels).loss
    assert expected.dtype == actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    expected.backward()
    actual.backward()
    for (name, p), q in zip(stock.named_parameters(), fused.parameters(), strict=True):
        scale = p.grad.float().abs().max().item()
        torch.testing.assert_close(q.grad.float(), p.grad.float(), rtol=0, atol=0.03 * scale, msg=name)


def test_the_soft_cap_is_honoured():
    """Gemma 2's loss with its cap differs clearly from the loss without it, and fusedce has
    the capped one (the parity test above checks it to the tolerance)."""
    stock, fused = _pair("gemma2")
    ids, labels = _batch()
    capped = fused(ids, labels=labels).loss
    stock.config.final_logit_softcapping = None
    uncapped = stock(ids, labels=labels).loss
    assert (capped - uncapped).abs() > 0.5


def test_tuple_outputs_leave_the_logits_out():
    stock, fused = _pair("llama")
    ids, labels = _batch()
    expected = stock(ids, labels=labels, return_dict=False)
    actual = fused(ids, labels=labels, return_dict=False)
    assert len(actual) == len(expected) - 1  # as for any output field that is None
    torch.testing.assert_close(actual[0], expected[0], rtol=RTOL, atol=ATOL)


def test_mismatched_labels_raise_as_stock():
    """logits_to_keep with labels for every position: both raise cross_entropy's error."""
    stock, fused = _pair("llama")
    ids, labels = _batch()
    with pytest.raises(ValueError, match=r"Expected input batch_size \(10\) to match target batch_size \(24\)"):
        stock(ids, labels=labels, logits_to_keep=5)
    with pytest.raises(ValueError, match=r"Expected input batch_size \(10\) to match target batch_size \(24\)"):
        fused(ids, labels=labels, logits_to_keep=5)


# --------------------------------------------------------------------------------------------
# Applying and removing
# --------------------------------------------------------------------------------------------


def test_remove_and_the_context_manager_restore_the_stock_model():
    torch.manual_seed(0)
    model = FAMILIES["llama"]()
    stock_repr = repr(model)
    ids, labels = _batch()
    with integration.apply(model) as applied:
        assert applied is model and repr(model) == stock_repr
        assert isinstance(model, transformers.LlamaForCausalLM) and type(model) is not transformers.LlamaForCausalLM
        assert type(model).__name__ == "LlamaForCausalLM"  # what save_pretrained writes
        assert model(ids, labels=labels).logits is None
        clone = copy.deepcopy(model)
        assert clone(ids, labels=labels).logits is None
        with pytest.raises(RuntimeError, match="already applied"):
            integration.apply(model)
    assert type(model) is transformers.LlamaForCausalLM and type(model.lm_head) is torch.nn.Linear
    assert model(ids, labels=labels).logits.shape == (BATCH, SEQ, VOCAB)
    with pytest.raises(ValueError, match="not applied"):
        integration.remove(model)
    integration.apply(model)
    integration.remove(model)
    assert type(model) is transformers.LlamaForCausalLM


def test_other_layouts_are_refused_naming_what_is_missing():
    torch.manual_seed(0)
    base = transformers.LlamaModel(transformers.LlamaConfig(**_LLAMA_LIKE))
    with pytest.raises(ValueError, match=r"LlamaModel .*lacks an `lm_head` submodule; a forward that takes `labels`"):
        integration.apply(base)
    model = FAMILIES["llama"]()
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="`loss_function` resolving to transformers' ForCausalLMLoss"):
        integration.apply(model)
    model = FAMILIES["llama"]()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match=r"plain torch.nn.Linear \(it is a Sequential\)"):
        integration.apply(model)
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        integration.apply(torch.nn.Linear(2, 2))


class _ShiftedLlama(transformers.LlamaForCausalLM):
    """A model that adds to its logits before the loss: not something fusedce can defer."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state) + 1.0
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class _TanhLlama(transformers.LlamaForCausalLM):
    """A soft cap written another way: 3 * tanh(logits / 2), through torch.nn.functional."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = 3.0 * torch.nn.functional.tanh(self.lm_head(self.model(input_ids).last_hidden_state) / 2.0)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_soft_cap_written_another_way():
    """p * tanh(s * logits) is capped at p with the hidden states scaled by s * p."""
    torch.manual_seed(0)
    stock = _TanhLlama(transformers.LlamaConfig(**_LLAMA_LIKE, initializer_range=0.2))
    fused = copy.deepcopy(stock)
    integration.apply(fused)
    ids, labels = _batch()
    expected, actual = stock(ids, labels=labels).loss, fused(ids, labels=labels).loss
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    expected.backward()
    actual.backward()
    _assert_gradients_match(stock, fused, "3 * tanh(logits / 2)")


class _OwnLossLlama(transformers.LlamaForCausalLM):
    """A model that computes its loss without ``self.loss_function``."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        return CausalLMOutputWithPast(loss=None if labels is None else logits.sum(), logits=logits)


def test_a_forward_fusedce_cannot_follow_raises_at_its_first_call():
    torch.manual_seed(0)
    ids, labels = _batch()
    shifted = _ShiftedLlama(transformers.LlamaConfig(**_LLAMA_LIKE))
    integration.apply(shifted)
    with pytest.raises(NotImplementedError, match=r"applies \[add\] to the logits"):
        shifted(ids, labels=labels)
    assert shifted(ids).logits.shape == (BATCH, SEQ, VOCAB)  # without labels it still runs
    own = _OwnLossLlama(transformers.LlamaConfig(**_LLAMA_LIKE))
    integration.apply(own)
    with pytest.raises(RuntimeError, match=r"did not pass lm_head's output to self\.loss_function"):
        own(ids, labels=labels)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


class _MemoryRecorder(TorchDispatchMode):
    """Every storage the ops allocate, while any tensor on it is alive: the peak of their total
    (bytes) and the largest one. The fused linear passes run inside the mode (not as one opaque
    op), so their own block buffers count; what is alive before the mode (weights, inputs) does
    not. A storage counts from the first op that returns a tensor on it until the last such
    tensor is freed (autograd keeps the tensors it saves alive, so those count too)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive on it]
        self.total = self.peak = self.largest = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.total -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("linear_ce_forward", "linear_ce_backward"):
            kernel = linear_ops._forward_kernel if name == "linear_ce_forward" else linear_ops._backward_kernel
            with self:
                out = kernel(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.total += storage.nbytes()
                self.peak = max(self.peak, self.total)
                self.largest = max(self.largest, storage.nbytes())
            self.live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def test_memory_stays_below_the_logits_on_a_large_vocabulary():
    """32000 classes, 512 tokens: the stock model holds the 62.5 MiB fp32 logits, their
    log-probabilities and their gradient; the fused one holds one 16 MiB block of them at most."""
    vocab, rows = 32000, 512
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=rows)
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config)
    fused = copy.deepcopy(stock)
    integration.apply(fused)
    ids = torch.randint(0, vocab, (2, rows // 2))
    logits_bytes = rows * vocab * 4
    recorders = {}
    for name, model in (("fused", fused), ("stock", stock)):
        with _MemoryRecorder() as recorders[name]:
            model(ids, labels=ids).loss.backward()
    fused_peak, stock_peak = recorders["fused"].peak, recorders["stock"].peak
    fused_largest, stock_largest = recorders["fused"].largest, recorders["stock"].largest
    print(f"peak live bytes over fwd+bwd: fused {fused_peak / logits_bytes:.2f}x, stock "
          f"{stock_peak / logits_bytes:.2f}x the logits; largest allocation: fused "
          f"{fused_largest / logits_bytes:.2f}x, stock {stock_largest / logits_bytes:.2f}x")
    assert recorders["stock"].largest >= logits_bytes and stock_peak >= 2 * logits_bytes
    assert recorders["fused"].largest <= logits_bytes // 3
    assert fused_peak <= stock_peak // 4
