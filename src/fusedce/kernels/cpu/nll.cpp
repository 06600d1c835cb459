// nll_loss: forward (per-row loss = -w[t]·x[t]) and backward (a scatter of -g·w[t] into zeros).
// Both are O(rows) apart from the zero fill of the gradient.
#include "common.h"
#include "ops.h"

namespace fusedce {
namespace {

constexpr int64_t kRowGrain = 4096;

template <typename scalar_t>
void nll_forward_kernel(const Tensor& x, const View2<int64_t>& tv,
                        const std::optional<Tensor>& weight, int64_t ignore_index, Tensor& loss) {
  using acc = acc_t<scalar_t>;
  const int64_t classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  acc* out = loss.data_ptr<acc>();
  at::parallel_for(0, loss.numel(), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / inner, i = r - o * inner;
      const int64_t c = tv(o, i);
      if (c == ignore_index) {
        out[r] = 0;  // masked, even when x is NaN
        continue;
      }
      out[r] = -(wp ? wp[c] : acc(1)) * static_cast<acc>(xv.row(o, i)[c * xv.s1]);
    }
  });
}

template <typename scalar_t>
void nll_backward_kernel(const Tensor& grad_loss, const View2<int64_t>& tv,
                         const std::optional<Tensor>& weight, int64_t ignore_index, Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t classes = grad.size(1), inner = grad.size(2);
  const auto gv = view2<acc>(grad_loss);
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, grad_loss.numel(), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / inner, i = r - o * inner;
      const int64_t c = tv(o, i);
      if (c != ignore_index) {  // ignored rows stay 0, even under a NaN upstream gradient
        out[(o * classes + c) * inner + i] = static_cast<scalar_t>(-gv(o, i) * (wp ? wp[c] : acc(1)));
      }
    }
  });
}

}  // namespace

Tensor nll_forward(const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight,
                   int64_t ignore_index) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form");
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), x.size(0), x.size(2), x.size(1), ignore_index);
  TORCH_CHECK(x.size(1) > 0 || t.numel() == 0, "index 0 is out of bounds for dimension 1 with size 0");
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = pooled_empty({x.size(0), x.size(2)}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_nll_forward", [&] {
    nll_forward_kernel<scalar_t>(x, view2<int64_t>(t), weight, ignore_index, loss);
  });
  return loss;
}

Tensor nll_backward(const Tensor& grad_loss, const Tensor& target,
                    const std::optional<Tensor>& weight, int64_t ignore_index, int64_t num_classes,
                    at::ScalarType dtype) {
  const int64_t outer = target.size(0), inner = target.size(1);
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), outer, inner, num_classes, ignore_index);  // guards the scatter
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor g = grad_loss.scalar_type() == acc_dtype ? grad_loss : grad_loss.to(acc_dtype);
  Tensor grad = empty_canonical(outer, num_classes, inner, grad_loss.options().dtype(dtype));
  grad.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedce_nll_backward", [&] {
    nll_backward_kernel<scalar_t>(g, view2<int64_t>(t), weight, ignore_index, grad);
  });
  return grad;
}

}  // namespace fusedce
