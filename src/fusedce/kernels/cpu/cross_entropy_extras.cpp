// cross_entropy with index targets and the LLM extras, z-loss and logit soft-capping:
// reference.py's ce_extras_forward and ce_extras_backward (the formulas and the NaN rules are
// cross_entropy.cpp's, applied to the capped logits x' = cap·tanh(x / cap)).
//
// One kernel per direction for every layout: a row at a time, its classes at any stride, the
// capped logit recomputed wherever a logit is read (tanh is elementwise, so nothing of the
// logits' size is stored). The forward walks a row twice (its max, then the exp-sum and the
// loss terms); the second walk finds the row in cache, so the logits come from memory once. The
// backward reads each logit once and writes its gradient once. Scalar code: these are the
// fused definitions, not the tuned paths of the default call (which never come here).
#include <cmath>

#include "common.h"
#include "ops.h"

namespace fusedce {
namespace {

template <typename acc>
struct Capped {
  acc cap;  // 0: no cap

  acc operator()(acc x) const { return cap != 0 ? cap * std::tanh(x / cap) : x; }
};

template <typename scalar_t>
void ce_extras_forward_kernel(const Tensor& x, const Tensor& target,
                              const std::optional<Tensor>& weight, int64_t ignore_index,
                              double smoothing, double z_loss, double softcap, Tensor& loss,
                              Tensor& stats) {
  using acc = acc_t<scalar_t>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto tv = view2<int64_t>(target);
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const acc total_w = w.total;
  const bool smooth = smoothing > 0;
  const acc eps = smooth ? static_cast<acc>(smoothing) : acc(0);
  const acc eps_per_class = eps / static_cast<acc>(classes);
  const acc z = static_cast<acc>(z_loss);
  const Capped<acc> capped{static_cast<acc>(softcap)};
  acc* loss_p = loss.data_ptr<acc>();
  acc* stats_p = stats.data_ptr<acc>();

  at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / inner, i = r - o * inner;
      const scalar_t* row = xv.row(o, i);
      acc m = -kInf<acc>;
      int64_t top = 0;  // a class at the max
      for (int64_t c = 0; c < classes; ++c) {
        const acc v = capped(static_cast<acc>(row[c * xv.s1]));
        if (v > m || std::isnan(v)) {
          m = v;
          top = c;
        }
        if (std::isnan(m)) {
          break;
        }
      }
      acc ls = kNaN<acc>, shifted = 0;  // shifted: Σ w_c·(x'_c - m), for the smoothing term
      if (std::isfinite(m)) {  // otherwise the row's log-sum is NaN, and so is its loss
        // Σ exp(d) = 1 + rest, with the class `top` left out of rest: log1p keeps a small rest's
        // digits (see ExpSumRest in common.h). The max's class is known by index, not found
        // again by d == 0: the compiler may contract capped(x) - m into one FMA, whose d at the
        // max is the product's rounding error rather than 0.
        acc rest = 0;
        for (int64_t c = 0; c < classes; ++c) {
          acc d = 0;
          if (c != top) {
            d = capped(static_cast<acc>(row[c * xv.s1])) - m;
            rest += std::exp(d);
          }
          if (smooth) {
            shifted += (wp ? wp[c] : acc(1)) * d;
          }
        }
        ls = std::log1p(rest);
      }
      stats_p[2 * r] = m;
      stats_p[2 * r + 1] = ls;
      const int64_t t = tv(o, i);
      if (t == ignore_index) {
        loss_p[r] = 0;  // torch masks the loss of an ignored row, even a NaN one
        continue;
      }
      const acc x_t = capped(static_cast<acc>(row[t * xv.s1]));
      acc l = (wp ? wp[t] : acc(1)) * ((m - x_t) + ls);
      if (smooth) {
        l = (1 - eps) * l + eps_per_class * (total_w * ls - shifted);
      }
      if (z != 0) {
        const acc lse = m + ls;
        l += z * (lse * lse);
      }
      loss_p[r] = l;
    }
  });
}

// grad_c = ((coef·p'_c - (ε/C)·w_c) - δ_ct·tc)·g·(1 - tanh²(x_c/cap)), in reference.py's order,
// with p'_c = exp((x'_c - m) - ls), tc = (1-ε)·w[t], coef = tc + (ε/C)·W + 2z·lse, and g = 0 on
// ignored rows (multiplying, so an ignored NaN row stays NaN, as in cross_entropy.cpp).
template <typename scalar_t>
void ce_extras_backward_kernel(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                               const std::optional<Tensor>& weight, const Tensor& stats,
                               int64_t ignore_index, double smoothing, double z_loss,
                               double softcap, Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto ov = view3<scalar_t>(out);
  const auto tv = view2<int64_t>(target);
  const auto gv = view2<acc>(grad_loss);
  const auto mv = view2<acc>(stats.select(2, 0)), lv = view2<acc>(stats.select(2, 1));
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const acc total_w = w.total;
  const acc eps = static_cast<acc>(smoothing);
  const bool smooth = smoothing > 0;
  const acc eps_per_class = smooth ? eps / static_cast<acc>(classes) : acc(0);
  const acc z2 = static_cast<acc>(2 * z_loss);
  const acc cap = static_cast<acc>(softcap);

  at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / inner, i = r - o * inner;
      const int64_t t = tv(o, i);
      const bool valid = t != ignore_index;
      const int64_t safe = valid ? t : 0;
      const acc g = valid ? gv(o, i) : acc(0);
      const acc m = mv(o, i), ls = lv(o, i);
      const acc target_coef = (1 - eps) * (wp ? wp[safe] : acc(1));
      const acc coef = target_coef + eps_per_class * total_w + z2 * (m + ls);
      const scalar_t* row = xv.row(o, i);
      scalar_t* dst = ov.row(o, i);
      for (int64_t c = 0; c < classes; ++c) {
        acc v = static_cast<acc>(row[c * xv.s1]);  // read before it is overwritten (in place)
        acc chain = 1;
        if (cap != 0) {
          const acc th = std::tanh(v / cap);
          v = cap * th;
          chain = 1 - th * th;
        }
        acc grad = coef * std::exp((v - m) - ls);
        if (smooth) {
          grad -= eps_per_class * (wp ? wp[c] : acc(1));
        }
        if (c == safe) {
          grad -= target_coef;
        }
        dst[c * ov.s1] = static_cast<scalar_t>(grad * g * chain);
      }
    }
  });
}

void check_extras_input(const Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form, got ",
              x.dim(), " dims");
  // Index targets need a class to pick (check_targets runs first, as in cross_entropy.cpp).
  TORCH_CHECK(x.size(1) > 0 || x.size(0) * x.size(2) == 0,
              "index 0 is out of bounds for dimension 1 with size 0");
}

at::ScalarType acc_dtype_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<Tensor, Tensor> ce_extras_forward(const Tensor& x, const Tensor& target,
                                             const std::optional<Tensor>& weight,
                                             int64_t ignore_index, double smoothing,
                                             double z_loss, double softcap) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form");
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), x.size(0), x.size(2), x.size(1), ignore_index);
  check_extras_input(x);
  Tensor loss = pooled_empty({x.size(0), x.size(2)}, x.options().dtype(acc_dtype_of(x)));
  Tensor stats = pooled_empty({x.size(0), x.size(2), 2}, loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_extras_forward", [&] {
        ce_extras_forward_kernel<scalar_t>(x, t, weight, ignore_index, smoothing, z_loss, softcap,
                                           loss, stats);
      });
  return {loss, stats};
}

Tensor ce_extras_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                          const std::optional<Tensor>& weight, const Tensor& stats,
                          int64_t ignore_index, double smoothing, double z_loss, double softcap,
                          bool inplace) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form");
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), x.size(0), x.size(2), x.size(1), ignore_index);
  check_extras_input(x);
  const auto acc_dtype = acc_dtype_of(x);
  Tensor out = inplace ? x : empty_like_canonical(x);
  auto per_row = [&](const Tensor& v) { return v.scalar_type() == acc_dtype ? v : v.to(acc_dtype); };
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_extras_backward", [&] {
        ce_extras_backward_kernel<scalar_t>(per_row(grad_loss), x, t, weight, per_row(stats),
                                            ignore_index, smoothing, z_loss, softcap, out);
      });
  return out;
}

}  // namespace fusedce
