// Launch functions of the CUDA kernels: plain C++ over raw pointers and a
// stream, no torch headers, so the kernels compile and can be tested on their
// own. The torch binding (cuda_ops.cpp) turns tensors into these arguments.
//
// Every launch_* returns the first CUDA error it met (cudaSuccess otherwise);
// it enqueues work on `stream` and never synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tts {
namespace cuda {

// Element types of `logits`.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------- beam_topk
//
// logits [R = B*K, V] of dtype `dtype_code`, rows `row_stride` elements apart,
// last dim contiguous; beam_scores [B, K] fp32 contiguous. Writes
//   s = ((x/T - m) - log d) + beam_scores[row],  x = logits (NaN -> -inf)
// top `C` per batch item of s viewed as [B, K*V], sorted descending, equal
// scores by lower flat index parent*V + token: scores [B, C] fp32,
// parents [B, C] and tokens [B, C] int64. 1 <= C <= K*V; K*V and R*V < 2^31.
//
// C <= beam_topk_fast_max_c() takes the fused split-vocabulary path; larger C a
// generic path (all scores, then a segmented radix sort) with a much larger
// workspace. The workspace size depends on the current device's SM count, so
// query it with the same device current as for the launch.
constexpr int beam_topk_fast_max_c() { return 32; }

size_t beam_topk_workspace_bytes(int B, int K, int V, int C);

cudaError_t launch_beam_topk(const void* logits, int dtype_code, int64_t row_stride,
                             const float* beam_scores, int B, int K, int V, int C,
                             float temperature, float* scores, int64_t* parents,
                             int64_t* tokens, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// ---------------------------------------------------------------- kv_reorder_
//
// In place, for every tensor: row i <- row parents[i] (as it was before the
// call), for all i with parents[i] != i. A tensor is N rows of `row_bytes`
// contiguous bytes, `row_stride_bytes` apart. Tensors must not overlap each
// other. parents [N] int64 on the device, values in [0, N) (not checked).
struct KvTensor {
  void* base;
  int64_t row_stride_bytes;
  int64_t row_bytes;
};

// Workspace for a reorder of these tensors: a flag per row plus a staging
// buffer of at most `scratch_budget` bytes (more passes when the rows do not
// fit at once; at least 16 bytes per row are always granted).
size_t kv_reorder_workspace_bytes(int64_t num_rows, const KvTensor* tensors, int num_tensors,
                                  size_t scratch_budget);

cudaError_t launch_kv_reorder(const KvTensor* tensors, int num_tensors, const int64_t* parents,
                              int64_t num_rows, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace tts
