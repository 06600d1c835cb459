// The common call in one step: cross_entropy(x, target) with a plain (N, C) input, int64 targets,
// no weight and no smoothing, reduced by 'mean' or 'sum'. The forward returns the scalar loss
// itself, so that the Python side runs one op instead of the per-row loss, the sum, the count of
// non-ignored targets and the division (each a dispatch and, in training, an autograd node).
// The arithmetic is functional.py's composite: the same per-row kernel, at::sum over its rows,
// and a division by the count, so that the fast path's values are the general path's, bit for bit.
#include "common.h"
#include "ops.h"

namespace fusedce {
namespace {

void check_plain(const Tensor& x, const Tensor& target) {
  TORCH_CHECK(x.dim() == 2 && target.dim() == 1 && target.scalar_type() == at::kLong,
              "fusedce: the reduced cross_entropy takes (N, C) logits and (N,) int64 targets");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ce_reduced_forward(const Tensor& x, const Tensor& target,
                                                      int64_t ignore_index, bool mean) {
  check_plain(x, target);
  // (N, C) -> (N, C, 1): the canonical form, always a view.
  auto [loss, lse] = ce_forward(x.unsqueeze(2), target.unsqueeze(1), std::nullopt, ignore_index, 0.0);
  const Tensor total = loss.sum();
  // 'mean' divides by the number of non-ignored rows (0/0 = NaN when there is none), 'sum' by 1.
  // The count is read on the host, as the targets already were by the forward's bounds check.
  int64_t count = target.size(0);
  if (mean) {
    const auto tv = target.accessor<int64_t, 1>();
    count = 0;
    for (int64_t r = 0; r < target.size(0); ++r) {
      count += tv[r] != ignore_index;
    }
  }
  Tensor denominator = at::scalar_tensor(mean ? static_cast<double>(count) : 1.0, total.options());
  Tensor out = (total / denominator).to(x.scalar_type());
  return {out, lse, denominator};
}

Tensor ce_reduced_backward(const Tensor& grad_out, const Tensor& x, const Tensor& target,
                           const Tensor& lse, const Tensor& denominator, int64_t ignore_index) {
  check_plain(x, target);
  // The 'mean' (or 'sum') node's backward: every row's upstream gradient is grad / denominator,
  // in the accumulation dtype, broadcast over the rows with a zero stride.
  const Tensor grad_rows =
      (grad_out.to(denominator.scalar_type()) / denominator).expand({x.size(0), 1});
  Tensor grad = ce_backward(grad_rows, x.unsqueeze(2), target.unsqueeze(1), std::nullopt, lse,
                            ignore_index, 0.0, false);
  return grad.squeeze(2);
}

}  // namespace fusedce
