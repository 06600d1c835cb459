// The Python module: one binding per kernel entry point (see ops.h). TORCH_EXTENSION_NAME is set
// by the build (fusedce.kernels.cpu), keyed on the sources and flags.
#include <torch/extension.h>

#include "ops.h"
#include "output_pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedce CPU kernels (ATen Vectorized + at::parallel_for)";
  m.def("ce_forward", &fusedce::ce_forward);
  m.def("ce_backward", &fusedce::ce_backward);
  m.def("ce_extras_forward", &fusedce::ce_extras_forward);
  m.def("ce_extras_backward", &fusedce::ce_extras_backward);
  m.def("ce_prob_forward", &fusedce::ce_prob_forward);
  m.def("ce_prob_backward", &fusedce::ce_prob_backward);
  m.def("nll_forward", &fusedce::nll_forward);
  m.def("nll_backward", &fusedce::nll_backward);
  m.def("ce_reduced_forward", &fusedce::ce_reduced_forward);
  m.def("ce_reduced_backward", &fusedce::ce_reduced_backward);
  m.def("log_softmax_forward", &fusedce::log_softmax_forward);
  m.def("log_softmax_backward", &fusedce::log_softmax_backward);
  m.def("softmax_forward", &fusedce::softmax_forward);
  m.def("softmax_backward", &fusedce::softmax_backward);
  m.def("empty_output_pool", &fusedce::empty_output_pool);
  m.def("pooled_empty", &fusedce::pooled_empty_cpu);
  m.def("accumulate_widened_", &fusedce::accumulate_widened_);
  m.def("narrowed", &fusedce::narrowed);
  m.def("max_row_abs_sum", &fusedce::max_row_abs_sum);
  m.def("inline_exp", &fusedce::inline_exp);
}
