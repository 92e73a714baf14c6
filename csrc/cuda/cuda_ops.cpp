// The CUDA kernels of the tts ops: tensors in, raw pointers and the current
// stream out to the launch functions of kernels.h. Checks here are on shapes,
// dtypes and devices only (never on values: that would need a host sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: no cuBLAS/cuSPARSE headers needed
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace tts {
namespace {

// Staging buffer granted to kv_reorder_ per call: a quarter of the cache but at
// least 64 MiB (less only if the whole cache is smaller). Reorders of larger
// caches run in a few passes instead of doubling their memory.
constexpr size_t kKvScratchFloor = size_t{64} << 20;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cuda(const at::Tensor& logits_in,
                                                              const at::Tensor& beam_scores_in,
                                                              int64_t num_candidates,
                                                              double temperature) {
  TORCH_CHECK(logits_in.dim() == 2, "beam_topk: logits must be 2-D [B*K, V], got ", logits_in.sizes());
  TORCH_CHECK(beam_scores_in.dim() == 2, "beam_topk: beam_scores must be 2-D [B, K], got ",
              beam_scores_in.sizes());
  TORCH_CHECK(beam_scores_in.scalar_type() == at::kFloat, "beam_topk: beam_scores must be float32, got ",
              beam_scores_in.scalar_type());
  TORCH_CHECK(logits_in.is_cuda() && beam_scores_in.device() == logits_in.device(),
              "beam_topk: logits and beam_scores must be on the same CUDA device");
  int dtype_code = 0;
  switch (logits_in.scalar_type()) {
    case at::kFloat: dtype_code = cuda::kFloat32; break;
    case at::kHalf: dtype_code = cuda::kFloat16; break;
    case at::kBFloat16: dtype_code = cuda::kBFloat16; break;
    default:
      TORCH_CHECK(false, "beam_topk: logits must be float32, float16 or bfloat16, got ", logits_in.scalar_type());
  }
  const int64_t B = beam_scores_in.size(0), K = beam_scores_in.size(1);
  const int64_t R = logits_in.size(0), V = logits_in.size(1);
  const int64_t C = num_candidates;
  TORCH_CHECK(B >= 1 && K >= 1 && V >= 1, "beam_topk: empty input");
  TORCH_CHECK(R == B * K, "beam_topk: logits has ", R, " rows, expected B*K = ", B * K);
  TORCH_CHECK(R < (int64_t{1} << 31), "beam_topk: B*K = ", R, " must be below 2^31");
  TORCH_CHECK(K * V < (int64_t{1} << 31), "beam_topk: K*V = ", K * V, " must be below 2^31");
  TORCH_CHECK(C >= 1 && C <= K * V, "beam_topk: num_candidates must be in [1, K*V], got ", C);
  TORCH_CHECK(C <= cuda::beam_topk_fast_max_c() || R * V < (int64_t{1} << 31),
              "beam_topk: num_candidates > ", cuda::beam_topk_fast_max_c(), " needs B*K*V < 2^31");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "beam_topk: temperature must be finite and > 0");

  const c10::cuda::CUDAGuard guard(logits_in.device());
  // The kernels need unit stride along V; rows may be any distance apart.
  const at::Tensor logits = (V > 1 && logits_in.stride(1) != 1) ? logits_in.contiguous() : logits_in;
  const at::Tensor beam_scores = beam_scores_in.contiguous();
  const int64_t row_stride = R > 1 ? logits.stride(0) : V;

  const auto fopts = logits.options().dtype(at::kFloat);
  const auto lopts = logits.options().dtype(at::kLong);
  at::Tensor scores = at::empty({B, C}, fopts);
  at::Tensor parents = at::empty({B, C}, lopts);
  at::Tensor tokens = at::empty({B, C}, lopts);

  const int b = static_cast<int>(B), k = static_cast<int>(K), v = static_cast<int>(V), c = static_cast<int>(C);
  const size_t ws_bytes = cuda::beam_topk_workspace_bytes(b, k, v, c);
  TORCH_CHECK(ws_bytes > 0, "beam_topk: no launch plan for B=", B, " K=", K, " V=", V, " C=", C);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(cuda::launch_beam_topk(logits.data_ptr(), dtype_code, row_stride, beam_scores.data_ptr<float>(),
                                    b, k, v, c, static_cast<float>(temperature), scores.data_ptr<float>(),
                                    parents.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
                                    workspace.data_ptr(), ws_bytes, stream),
             "beam_topk");
  return {scores, parents, tokens};
}

// Dims 1.. of t are one contiguous block per row (size-1 dims may have any stride).
bool rows_are_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

void kv_reorder_cuda(at::TensorList caches, const at::Tensor& parents_in) {
  TORCH_CHECK(parents_in.dim() == 1 && parents_in.scalar_type() == at::kLong,
              "kv_reorder_: parents must be 1-D int64");
  TORCH_CHECK(parents_in.is_cuda(), "kv_reorder_: parents must be on a CUDA device");
  const int64_t n = parents_in.size(0);
  // Check every tensor before writing any.
  for (size_t t = 0; t < caches.size(); ++t) {
    const at::Tensor& c = caches[t];
    TORCH_CHECK(c.device() == parents_in.device(), "kv_reorder_: caches[", t, "] is on ", c.device(),
                " but parents is on ", parents_in.device());
    TORCH_CHECK(c.dim() >= 1 && c.size(0) == n, "kv_reorder_: caches[", t, "] must have ", n, " rows, got shape ",
                c.sizes());
  }
  if (n == 0 || caches.empty()) return;

  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  std::vector<cuda::KvTensor> descs;
  descs.reserve(caches.size());
  for (size_t t = 0; t < caches.size(); ++t) {
    const at::Tensor& c = caches[t];
    if (c.numel() == 0) continue;
    const int64_t row_elems = c.numel() / n;
    if (!rows_are_contiguous(c) || (n > 1 && c.stride(0) < row_elems)) {
      // Rows that are not one block each, or that overlap: the generic
      // out-of-place path (index_select reads everything before copy_ writes;
      // copy_ itself rejects a tensor whose elements alias each other).
      c.copy_(c.index_select(0, parents));
      continue;
    }
    const int64_t esize = static_cast<int64_t>(c.element_size());
    descs.push_back({c.data_ptr(), c.stride(0) * esize, row_elems * esize});
  }
  if (descs.empty()) return;

  size_t total = 0;
  for (const auto& d : descs) total += static_cast<size_t>(d.row_bytes) * static_cast<size_t>(n);
  const size_t budget = std::max(kKvScratchFloor, total / 4);
  const size_t ws_bytes = cuda::kv_reorder_workspace_bytes(n, descs.data(), static_cast<int>(descs.size()), budget);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, parents.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(cuda::launch_kv_reorder(descs.data(), static_cast<int>(descs.size()), parents.data_ptr<int64_t>(), n,
                                     workspace.data_ptr(), ws_bytes, stream),
             "kv_reorder_");
}

}  // namespace
}  // namespace tts

TORCH_LIBRARY_IMPL(tts, CUDA, m) {
  m.impl("beam_topk", &tts::beam_topk_cuda);
  m.impl("kv_reorder_", &tts::kv_reorder_cuda);
}
