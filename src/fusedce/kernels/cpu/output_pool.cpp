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
constexpr size_t kMaxBytes = size_t(64) << 20;  // mid-sized: up to here
constexpr size_t kMaxKept = 12;                  // a call's gradient, per-row loss and stats, twice over
constexpr size_t kMaxKeptBytes = size_t(320) << 20;  // and a linear head's block scratch (chunked.py)
constexpr size_t kMaxKeptLarge = 2;              // a softmax's output and its gradient
constexpr size_t kMaxKeptLargeBytes = size_t(1) << 30;  // so that a one-off output is not hoarded

// One size class: its kept storages, oldest first, and its bounds.
struct Shelf {
  std::vector<c10::Storage> kept;
  size_t max_count, max_bytes;
};

struct Pool {
  std::mutex mutex;
  Shelf mid{{}, kMaxKept, kMaxKeptBytes};
  Shelf large{{}, kMaxKeptLarge, kMaxKeptLargeBytes};
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
  if (bytes < kMinBytes || options.device().type() != at::kCPU) {
    return at::empty(sizes, options);
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  Shelf& shelf = bytes > kMaxBytes ? p.large : p.mid;
  for (auto it = shelf.kept.begin(); it != shelf.kept.end(); ++it) {
    if (it->nbytes() == bytes && idle(*it)) {
      at::Tensor out = at::empty({0}, options);
      out.set_(*it, 0, sizes, c10::contiguous_strides(sizes));
      // Most recently used last, so that eviction takes the coldest.
      std::rotate(it, it + 1, shelf.kept.end());
      return out;
    }
  }
  at::Tensor out = at::empty(sizes, options);
  if (bytes > shelf.max_bytes) {
    return out;  // never kept, and nothing evicted for it
  }
  // Make room, the oldest idle storage first; when every kept one is in use, the oldest reference
  // (dropping it frees nothing: its tensors live on).
  auto kept_bytes = [&shelf] {
    size_t total = 0;
    for (const auto& s : shelf.kept) total += s.nbytes();
    return total;
  };
  while (!shelf.kept.empty() &&
         (shelf.kept.size() >= shelf.max_count || kept_bytes() + bytes > shelf.max_bytes)) {
    auto victim = std::find_if(shelf.kept.begin(), shelf.kept.end(), idle);
    shelf.kept.erase(victim != shelf.kept.end() ? victim : shelf.kept.begin());
  }
  shelf.kept.push_back(out.storage());
  return out;
}

at::Tensor pooled_empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return pooled_empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

void empty_output_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.mid.kept.clear();
  p.large.kept.clear();
}

}  // namespace fusedce
