// See output_pool.h for why the kernels' outputs are pooled, and its bounds.
#include "output_pool.h"

#include <c10/core/Storage.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <vector>

namespace fusedce {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;   // smaller ones come from malloc's heap, no faults
constexpr size_t kMaxBytes = size_t(64) << 20;  // larger ones: huge pages (common.h) and no hoarding
constexpr size_t kMaxKept = 8;                   // a call's gradient, per-row loss and stats, twice over
constexpr size_t kMaxKeptBytes = size_t(128) << 20;

struct Pool {
  std::mutex mutex;
  std::vector<c10::Storage> kept;  // oldest first
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: outputs may outlive static destruction
  return *instance;
}

// The pool's reference is the only one: no tensor (and no Python storage object) refers to it.
bool idle(const c10::Storage& storage) { return storage.use_count() == 1; }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes || bytes > kMaxBytes || options.device().type() != at::kCPU) {
    return at::empty(sizes, options);
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (auto it = p.kept.begin(); it != p.kept.end(); ++it) {
    if (it->nbytes() == bytes && idle(*it)) {
      at::Tensor out = at::empty({0}, options);
      out.set_(*it, 0, sizes, c10::contiguous_strides(sizes));
      // Most recently used last, so that eviction takes the coldest.
      std::rotate(it, it + 1, p.kept.end());
      return out;
    }
  }
  at::Tensor out = at::empty(sizes, options);
  // Make room, the oldest idle storage first; when every kept one is in use, the oldest reference
  // (dropping it frees nothing: its tensors live on).
  auto kept_bytes = [&p] {
    size_t total = 0;
    for (const auto& s : p.kept) total += s.nbytes();
    return total;
  };
  while (!p.kept.empty() && (p.kept.size() >= kMaxKept || kept_bytes() + bytes > kMaxKeptBytes)) {
    auto victim = std::find_if(p.kept.begin(), p.kept.end(), idle);
    p.kept.erase(victim != p.kept.end() ? victim : p.kept.begin());
  }
  p.kept.push_back(out.storage());
  return out;
}

void empty_output_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.kept.clear();
}

}  // namespace fusedce
