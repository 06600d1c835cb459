// The row path's inline exp (common.h, exp_avx512) over a float32 tensor: the error bounds that
// common.h states for it are measured by tests/test_inline_exp.py through this entry point.
#include "common.h"
#include "ops.h"

namespace fusedce {

at::Tensor inline_exp(const at::Tensor& x, int64_t degree) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(),
              "fusedce: inline_exp takes a contiguous 1-D float32 tensor");
  TORCH_CHECK(degree == 4 || degree == 6, "fusedce: inline_exp's degree is 4 or 6, not ", degree);
#if defined(CPU_CAPABILITY_AVX512)
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, src + j);
    _mm512_mask_storeu_ps(dst + j, lanes, degree == 4 ? exp_avx512<4>(v) : exp_avx512<6>(v));
  }
  return out;
#else
  TORCH_CHECK(false, "fusedce: the inline exp is the AVX512 build's; this one is not (FUSEDCE_CPU_ISA)");
#endif
}

}  // namespace fusedce
