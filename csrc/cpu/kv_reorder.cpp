// kv_reorder_ on CPU: cache[i] <- cache[parents[i]] in place, for every tensor.
//
// Only rows with parents[i] != i are written. A changed row whose source is
// itself a changed row would be overwritten before it is read, so those sources
// are staged in a scratch buffer first (phase 1); every other source is an
// untouched row and is copied directly (phase 2). Copies are memcpy of whole
// rows, parallel over (tensor, changed row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/parallel.h"

namespace tts {
namespace {

struct Plan {
  std::vector<int64_t> dst, src, stage;  // stage[k] >= 0: source staged in slot stage[k]
  int64_t num_staged = 0;
};

Plan make_plan(const at::Tensor& parents) {
  const int64_t n = parents.size(0);
  const int64_t* p = parents.data_ptr<int64_t>();
  std::vector<char> changed(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < n, "kv_reorder_: parents[", i, "] = ", p[i], " is out of range [0, ", n, ")");
    changed[i] = p[i] != i;
  }
  Plan plan;
  for (int64_t i = 0; i < n; ++i) {
    if (!changed[i]) continue;
    plan.dst.push_back(i);
    plan.src.push_back(p[i]);
    plan.stage.push_back(changed[p[i]] ? plan.num_staged++ : -1);
  }
  return plan;
}

void kv_reorder_cpu(at::TensorList caches, const at::Tensor& parents_in) {
  TORCH_CHECK(parents_in.dim() == 1 && parents_in.scalar_type() == at::kLong, "kv_reorder_: parents must be 1-D int64");
  const at::Tensor parents = parents_in.contiguous();
  const int64_t n = parents.size(0);
  // Check everything before writing anything.
  for (size_t t = 0; t < caches.size(); ++t) {
    const at::Tensor& c = caches[t];
    TORCH_CHECK(c.dim() >= 1 && c.size(0) == n, "kv_reorder_: caches[", t, "] must have ", n, " rows");
    TORCH_CHECK(c.device().is_cpu(), "kv_reorder_: caches[", t, "] must be on the CPU");
  }
  const Plan plan = make_plan(parents);
  const int64_t m = static_cast<int64_t>(plan.dst.size());
  if (m == 0) return;
  for (size_t t = 0; t < caches.size(); ++t) {
    at::Tensor c = caches[t];
    if (c.numel() == 0) continue;
    // Rows must be contiguous blocks for memcpy; otherwise use the generic path.
    if (!c[0].is_contiguous()) {
      const at::Tensor idx = at::from_blob(const_cast<int64_t*>(plan.dst.data()), {m}, at::kLong);
      const at::Tensor sidx = at::from_blob(const_cast<int64_t*>(plan.src.data()), {m}, at::kLong);
      c.index_copy_(0, idx, c.index_select(0, sidx));
      continue;
    }
    const int64_t row_bytes = c[0].numel() * c.element_size();
    const int64_t stride_bytes = c.stride(0) * c.element_size();
    char* base = static_cast<char*>(c.data_ptr());
    std::vector<char> scratch(plan.num_staged * row_bytes);
    const int64_t grain = tts::grain_for(row_bytes / 4);
    at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        if (plan.stage[k] >= 0)
          std::memcpy(scratch.data() + plan.stage[k] * row_bytes, base + plan.src[k] * stride_bytes, row_bytes);
    });
    at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const char* from = plan.stage[k] >= 0 ? scratch.data() + plan.stage[k] * row_bytes
                                               : base + plan.src[k] * stride_bytes;
        std::memcpy(base + plan.dst[k] * stride_bytes, from, row_bytes);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tts, CPU, m) { m.impl("kv_reorder_", &kv_reorder_cpu); }

}  // namespace tts
