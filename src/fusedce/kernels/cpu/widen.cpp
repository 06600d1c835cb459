// The linear head's float32 weight-gradient sum over half-precision blocks (linear/chunked.py):
// acc = float(block) for the first block, acc += float(block) for the others, in one vectorised
// pass each. Through ATen that is a conversion copy into a scratch and an add_, about three times
// the memory traffic; at the bf16 lmhead shape it was 60 ms of a 510 ms step. Each element is
// the same float32 operation as ATen's (the widening is exact), so the sums agree bit for bit.
// The final rounding back to half precision (narrowed) is one pass too, rounding as ATen does;
// max_row_abs_sum is the finite-logits bound's max_c ||W_c||_1 (linear/rows.py), in float32.
#include "common.h"
#include "ops.h"

#include <cmath>
#include <vector>

namespace fusedce {

void accumulate_widened_(at::Tensor& acc, const at::Tensor& block, bool assign) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && block.is_contiguous() &&
                  acc.numel() == block.numel() &&
                  (block.scalar_type() == at::kBFloat16 || block.scalar_type() == at::kHalf),
              "fusedce: accumulate_widened_ takes a contiguous float32 sum and a contiguous "
              "half-precision block of as many elements");
  AT_DISPATCH_REDUCED_FLOATING_TYPES(block.scalar_type(), "accumulate_widened_", [&] {
    using IO = VecIO<scalar_t>;
    float* sum = acc.data_ptr<float>();
    const scalar_t* src = block.const_data_ptr<scalar_t>();
    at::parallel_for(0, acc.numel(), int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
      int64_t i = lo;
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        typename IO::AVec v[IO::kPer];
        IO::load(src + i, v);
        for (int64_t k = 0; k < IO::kPer; ++k) {
          float* p = sum + i + k * IO::kLanes;
          (assign ? v[k] : Vectorized<float>::loadu(p) + v[k]).store(p);
        }
      }
      for (; i < hi; ++i) {
        sum[i] = assign ? static_cast<float>(src[i]) : sum[i] + static_cast<float>(src[i]);
      }
    });
  });
}

at::Tensor narrowed(const at::Tensor& acc, at::ScalarType dtype) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() &&
                  (dtype == at::kBFloat16 || dtype == at::kHalf),
              "fusedce: narrowed takes a contiguous float32 tensor and a half-precision dtype");
  at::Tensor out = pooled_empty(acc.sizes(), acc.options().dtype(dtype));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "narrowed", [&] {
    using IO = VecIO<scalar_t>;
    const float* src = acc.const_data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, acc.numel(), int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
      int64_t i = lo;
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        typename IO::AVec v[IO::kPer];
        for (int64_t k = 0; k < IO::kPer; ++k) v[k] = Vectorized<float>::loadu(src + i + k * IO::kLanes);
        IO::store(dst + i, v);  // round to nearest even, as ATen's conversion
      }
      for (; i < hi; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    });
  });
  return out;
}

double max_row_abs_sum(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf ||
                   w.scalar_type() == at::kFloat),
              "fusedce: max_row_abs_sum takes a contiguous 2-D float32 or half-precision matrix");
  const int64_t rows = w.size(0), cols = w.size(1);
  float result = 0.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "max_row_abs_sum", [&] {
    using IO = VecIO<scalar_t>;
    const scalar_t* data = w.const_data_ptr<scalar_t>();
    std::vector<float> partial(static_cast<size_t>(rows), 0.0f);
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(cols, 1)),
                     [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = data + r * cols;
        using acc = typename IO::acc;
        typename IO::AVec sum(acc(0));
        int64_t c = 0;
        for (; c + IO::kStep <= cols; c += IO::kStep) {
          typename IO::AVec v[IO::kPer];
          IO::load(row + c, v);
          for (int64_t k = 0; k < IO::kPer; ++k) sum = sum + v[k].abs();
        }
        acc total = at::vec::vec_reduce_all<acc>([](auto a, auto b) { return a + b; }, sum);
        for (; c < cols; ++c) total += std::abs(static_cast<acc>(row[c]));
        partial[static_cast<size_t>(r)] = static_cast<float>(total);
      }
    });
    // NaN anywhere must reach the caller (its bound comparison then fails): no fmax here.
    for (const float v : partial) result = (v > result || v != v) ? v : result;
  });
  return result;
}

}  // namespace fusedce
