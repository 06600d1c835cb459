// Reuse of the kernels' large outputs (gradients, softmax outputs) once the caller has let them go.
//
// A fresh CPU allocation of tens of MB is a fresh mapping: the kernel zeroes every page the first
// time it is touched, which costs as much as the loss's own pass over memory (docs/benchmarks.md).
// A training step drops last step's gradients (zero_grad(set_to_none=True), or the logits'
// gradient freed as soon as the layer below has used it) and asks for the same sizes again, so
// this pool keeps the storages of the last few outputs and hands one back out when nobody else
// holds it any more (its use count is the pool's own reference alone). CUDA's caching allocator
// does this for every tensor; torch's CPU allocator does not.
//
// Bounded: outputs of kMinBytes to kMaxBytes (1 to 64 MiB) are kept, at most kMaxKept (12) of them
// and kMaxKeptBytes (320 MiB) in all (a 16x21x128x128 segmentation gradient is 22 MB, its per-row
// loss and stats 1 and 2 MB: their fresh pages cost the seg forward 0.7 ms of its 1.8; the linear
// head takes its block scratch and weight-gradient sum from here too, 200 MB at the bf16 lmhead
// shape, see linear/chunked.py's scratch). Larger
// ones, an LM's (N, C) gradient, are kept two at most and kMaxKeptLargeBytes (1 GiB) in all: the
// lm-32k bfloat16 backward took 18.38 ms into a fresh 262 MB gradient and 12.76 ms into a kept
// one (`python -m fusedce bench`, benchmarks/RESULTS.md). Holding one idle between steps does not raise a training step's peak: the
// step allocates the same gradient again at the start of its backward, on top of everything its
// forward still holds. The byte bound caps what a one-off large output leaves behind; an output
// above it is never kept.
// Below kMinBytes malloc's heap serves without faults.
// fusedce.empty_cache() releases them.
#pragma once

#include <ATen/ATen.h>

namespace fusedce {

// An uninitialised contiguous tensor of ``sizes``: a kept storage of exactly its bytes when one is
// free, else a fresh one (then kept when it is in the pool's size range).
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// pooled_empty for Python (the linear head's scratch): a CPU tensor of ``dtype``.
at::Tensor pooled_empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype);

// Drop every kept storage (those still in use live on with their tensors).
void empty_output_pool();

}  // namespace fusedce
