// The kernel entry points, one per function of fusedce.kernels.reference (same arguments, same
// semantics; see reference.py for the specification, and for the (outer, inner, 2) row stats). Defined in cross_entropy.cpp, nll.cpp and
// softmax.cpp; bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fusedce {

std::tuple<at::Tensor, at::Tensor> ce_forward(const at::Tensor& x, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              int64_t ignore_index, double smoothing);

at::Tensor ce_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                       int64_t ignore_index, double smoothing, bool inplace);

// Index targets with the LLM extras, z-loss and a logit soft-cap (0 for none): reference.py's
// ce_extras_forward and ce_extras_backward (cross_entropy_extras.cpp).
std::tuple<at::Tensor, at::Tensor> ce_extras_forward(const at::Tensor& x, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double smoothing,
                                                     double z_loss, double softcap);

at::Tensor ce_extras_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const at::Tensor& stats, int64_t ignore_index, double smoothing,
                              double z_loss, double softcap, bool inplace);

std::tuple<at::Tensor, at::Tensor> ce_prob_forward(const at::Tensor& x, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   double smoothing);

at::Tensor ce_prob_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const at::Tensor& stats, double smoothing, bool inplace);

at::Tensor nll_forward(const at::Tensor& x, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, int64_t ignore_index);

at::Tensor nll_backward(const at::Tensor& grad_loss, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, int64_t ignore_index,
                        int64_t num_classes, at::ScalarType dtype);

// The plain (N, C) 'mean'/'sum' loss in one call (cross_entropy_reduced.cpp): returns the scalar
// loss in x's dtype, the per-row lse and the denominator it divided by, for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_reduced_forward(const at::Tensor& x,
                                                                  const at::Tensor& target,
                                                                  int64_t ignore_index, bool mean);

at::Tensor ce_reduced_backward(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& target, const at::Tensor& lse,
                               const at::Tensor& denominator, int64_t ignore_index);

at::Tensor log_softmax_forward(const at::Tensor& x);
at::Tensor log_softmax_backward(const at::Tensor& grad_out, const at::Tensor& out);
at::Tensor softmax_forward(const at::Tensor& x);
at::Tensor softmax_backward(const at::Tensor& grad_out, const at::Tensor& out);

// The linear head's float32 weight-gradient sum over half-precision blocks (widen.cpp):
// acc = float(block) when assign, else acc += float(block).
void accumulate_widened_(at::Tensor& acc, const at::Tensor& block, bool assign);
// acc rounded to the half-precision dtype, to nearest even (widen.cpp).
at::Tensor narrowed(const at::Tensor& acc, at::ScalarType dtype);
// max over the rows of W of sum |W_rc|, in float32 (NaN if any is NaN) (widen.cpp).
double max_row_abs_sum(const at::Tensor& w);

// The row path's inline exp of the given degree (4 or 6) over a contiguous 1-D float32 tensor, on
// the AVX512 build (exp_probe.cpp): for the test of its accuracy.
at::Tensor inline_exp(const at::Tensor& x, int64_t degree);

}  // namespace fusedce
