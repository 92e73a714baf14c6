// beam_topk on CUDA: one read of the logits, split over the vocabulary.
//
//   x = logits / T, then NaN and +inf -> -inf      (true division when T != 1)
//   s[r, v] = ((x[r, v] - m[r]) - log d[r]) + beam_scores[r]
//   m[r] = max_v x[r, v],  d[r] = sum_v exp(x[r, v] - m[r])
//   top C of s viewed as [B, K*V], descending, equal scores by lower flat index
//
// Fused path (C <= 32), two launches:
//  1. beam_partial_kernel, grid (R rows, S splits), 256 threads: each block
//     streams its chunk of one row once (16-byte loads), keeping
//     per thread an online (max, sum-exp) pair and a sorted top-N list of scaled
//     logits in registers. A per-row constant cannot reorder a row, so a row's
//     top C by scaled logit are its top C by score. The block then merges the
//     pairs and pulls its top C out of the per-thread lists (C rounds of a
//     block-wide max), writing a partial record (m, d, C keys).
//  2. beam_merge_kernel, grid (B,): merges each row's S partial pairs into its
//     log-sum-exp, scores the K*S*C surviving keys of the item, and selects the
//     top C across beams the same way.
// Generic path (C > 32, up to K*V): stage 1 without lists, a kernel writing
// every score with its flat index, a stable segmented radix sort (CUB) per item
// (stability gives the tie order), and a gather of the first C.
//
// Candidates are packed 64-bit keys: high word = the float's bits made
// order-preserving as unsigned, low word = 2^32-1-index. The larger key is the
// better candidate (higher score, then lower index), so every comparison and
// reduction is one integer op, and value and index come back exactly. Key 0 is
// below every real key (even -inf's) and marks an empty slot.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tts {
namespace cuda {
namespace {

using Key = unsigned long long;

// 256 threads: 8 warps per block, enough loads in flight per block for a
// streaming pass, and per-thread top lists of up to 32 keys (64 registers) still
// leave room for two resident blocks per SM.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFastMaxC = beam_topk_fast_max_c();
// A split shorter than 8 elements per thread spends more on its partial record
// and the C-round block selection than on reading.
constexpr int kMinChunk = 8 * kThreads;
constexpr int kMaxSplits = 64;
// Blocks per SM wanted in stage 1: a memory-bound stream needs several resident
// blocks per SM to cover DRAM latency.
constexpr int kBlocksPerSm = 4;
// Stage 2 handles K*S*C keys per item in one block; keep S*C per row modest so
// that the second launch stays small next to the first.
constexpr int kMaxKeysPerRow = 1024;
// Chunk lengths are multiples of 8 elements (16 bytes of fp16/bf16, 32 of
// fp32), so in an aligned row no chunk needs a scalar head.
constexpr int kChunkQuantum = 8;
constexpr size_t kAlign = 256;

inline size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
// In 64 bits: V, C and K*V may come within a few of 2^31 - 1, where a + b - 1
// would overflow an int.
inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ------------------------------------------------------------------ keys

__device__ __forceinline__ Key make_key(float v, unsigned idx) {
  unsigned b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0u;  // -0.0 and +0.0 are the same score
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<Key>(b) << 32) | static_cast<Key>(0xFFFFFFFFu - idx);
}

__device__ __forceinline__ float key_value(Key k) {
  unsigned b = static_cast<unsigned>(k >> 32);
  b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
  return __uint_as_float(b);
}

__device__ __forceinline__ unsigned key_index(Key k) {
  return 0xFFFFFFFFu - static_cast<unsigned>(k & 0xFFFFFFFFull);
}

__device__ __forceinline__ Key key_max(Key a, Key b) { return a > b ? a : b; }

__device__ __forceinline__ Key warp_max(Key v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = key_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A thread's best N keys, sorted descending, in registers (all indices are
// compile-time after unrolling, so nothing spills to local memory).
template <int N>
struct TopList {
  Key k[N];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < N; ++i) k[i] = 0;
  }
  __device__ __forceinline__ void push(Key key) {
    if (key <= k[N - 1]) return;  // the common case once the list has filled
    k[N - 1] = key;
#pragma unroll
    for (int i = N - 1; i > 0; --i) {
      const Key hi = key_max(k[i], k[i - 1]);
      const Key lo = k[i] ^ k[i - 1] ^ hi;
      k[i - 1] = hi;
      k[i] = lo;
    }
  }
  __device__ __forceinline__ void pop() {
#pragma unroll
    for (int i = 0; i < N - 1; ++i) k[i] = k[i + 1];
    k[N - 1] = 0;
  }
};

template <>
struct TopList<0> {  // stage 1 of the generic path: (m, d) only
  __device__ __forceinline__ void init() {}
  __device__ __forceinline__ void push(Key) {}
};

// The block's best C keys, in order, from the per-thread lists: C rounds of a
// block-wide max; the thread holding the winner pops it. emit(c, key) runs on
// thread 0. Every thread must call it (it synchronises).
template <int N, typename Emit>
__device__ void block_select(TopList<N>& top, int C, Emit emit) {
  __shared__ Key warp_best[kWarps];
  __shared__ Key winner;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int c = 0; c < C; ++c) {
    const Key mine = top.k[0];
    const Key w = warp_max(mine);
    if (lane == 0) warp_best[warp] = w;
    __syncthreads();
    if (warp == 0) {
      const Key v = warp_max(lane < kWarps ? warp_best[lane] : 0ull);
      if (lane == 0) winner = v;
    }
    __syncthreads();
    const Key win = winner;  // every thread reads it before the next round's first barrier
    if (threadIdx.x == 0) emit(c, win);
    if (win == 0) {  // only empty slots left (chunk shorter than C): pad
      if (threadIdx.x == 0)
        for (int r = c + 1; r < C; ++r) emit(r, 0ull);
      break;  // uniform: all threads saw the same winner
    }
    if (mine == win) top.pop();  // keys are unique, so exactly one thread pops
  }
}

// ------------------------------------------------------------------ online softmax pair

__device__ __forceinline__ void md_combine(float& m, float& d, float m2, float d2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) {  // both empty / all -inf: stay (-inf, 0), no -inf - -inf
    m = M;
    d = 0.f;
    return;
  }
  d = d * __expf(m - M) + d2 * __expf(m2 - M);
  m = M;
}

// Block-wide (m, d); the result is valid on thread 0.
__device__ void block_md(float& m, float& d) {
  __shared__ float sm[kWarps];
  __shared__ float sd[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float d2 = __shfl_xor_sync(0xffffffffu, d, o);
    md_combine(m, d, m2, d2);
  }
  if ((threadIdx.x & 31) == 0) {
    sm[threadIdx.x >> 5] = m;
    sd[threadIdx.x >> 5] = d;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = sm[0];
    d = sd[0];
    for (int w = 1; w < kWarps; ++w) md_combine(m, d, sm[w], sd[w]);
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float scale(float x, bool apply_t, float t) {
  // __fdiv_rn: a true IEEE division even under --use_fast_math (the op is
  // defined with x / T, and an approximate divide would change the ranking).
  if (apply_t) x = __fdiv_rn(x, t);
  // NaN and +inf (overflow garbage, also from x / T) are never a choice.
  return (isnan(x) || x == INFINITY) ? -INFINITY : x;
}

// key_ties: the row's beam score is infinite, so all its scores are equal and
// its candidates rank by index alone (value 0 in the key; see the kernel).
template <int N>
__device__ __forceinline__ void consume(float x, unsigned idx, bool key_ties, float& m, float& d,
                                        TopList<N>& top) {
  if (x > m) {  // one exp per element either way
    d = d * __expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    d += __expf(x - m);
  }
  top.push(make_key(key_ties ? 0.f : x, idx));
}

// ------------------------------------------------------------------ kernels

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    beam_partial_kernel(const T* __restrict__ logits, int64_t row_stride, int V, int chunk, int S,
                        int C, float temperature, const float* __restrict__ beam_scores,
                        float* __restrict__ part_m, float* __restrict__ part_d,
                        Key* __restrict__ part_keys) {
  const int row = blockIdx.x;
  const int split = blockIdx.y;
  // A finished beam at -inf (or a beam at +inf) gives every token of the row
  // the same score: a tie, decided by index rather than by logit. Its keys
  // carry the value 0; stage 2 still forms +-inf from 0 + the beam score.
  const bool key_ties = isinf(beam_scores[row]);
  const T* p = logits + static_cast<int64_t>(row) * row_stride;
  const int start = split * chunk;
  // start + chunk passes 2^31 - 1 on the last split when V is near it (the
  // rounded chunks overshoot V), so the sum is taken in 64 bits.
  const int end = static_cast<int>(min(static_cast<long long>(start) + chunk, static_cast<long long>(V)));
  const bool apply_t = temperature != 1.f;
  float m = -INFINITY, d = 0.f;
  TopList<N> top;
  top.init();
  // Scalar head up to the first 16-byte boundary, 16-byte loads through the
  // body, scalar tail: every row gets vector loads whatever V and the row
  // stride are (elements are always sizeof(T)-aligned).
  constexpr int kVec = 16 / sizeof(T);
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p + start) & 15u);
  const int body = start + min(((16 - misalign) & 15) / static_cast<int>(sizeof(T)), end - start);
  // Head and tail are shorter than kVec < kThreads elements: one element per
  // thread at most (no i += kThreads, which could pass 2^31 - 1 near V's limit).
  if (static_cast<int>(threadIdx.x) < body - start) {
    const int i = start + threadIdx.x;
    consume(scale(to_float(p[i]), apply_t, temperature), i, key_ties, m, d, top);
  }
  const int nvec = (end - body) / kVec;
  const uint4* pv = reinterpret_cast<const uint4*>(p + body);
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    const uint4 raw = __ldcs(pv + i);  // read once: stream past the caches
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      consume(scale(to_float(e[j]), apply_t, temperature), body + i * kVec + j, key_ties, m, d,
              top);
  }
  if (static_cast<int>(threadIdx.x) < end - (body + nvec * kVec)) {
    const int i = body + nvec * kVec + threadIdx.x;
    consume(scale(to_float(p[i]), apply_t, temperature), i, key_ties, m, d, top);
  }

  block_md(m, d);
  const int64_t rec = static_cast<int64_t>(row) * S + split;
  if (threadIdx.x == 0) {
    part_m[rec] = m;
    part_d[rec] = d;
  }
  if constexpr (N > 0) {
    Key* out = part_keys + rec * C;
    block_select(top, C, [&](int c, Key k) { out[c] = k; });
  }
}

// (m, log d) of one row from its S partial records; m = -inf marks a dead row.
__device__ __forceinline__ void row_lse(const float* part_m, const float* part_d, int64_t r, int S,
                                        float& m, float& logd) {
  float d = 0.f;
  m = -INFINITY;
  for (int s = 0; s < S; ++s) md_combine(m, d, part_m[r * S + s], part_d[r * S + s]);
  logd = d > 0.f ? __logf(d) : 0.f;
}

template <int N>
__global__ void __launch_bounds__(kThreads)
    beam_merge_kernel(const float* __restrict__ part_m, const float* __restrict__ part_d,
                      const Key* __restrict__ part_keys, const float* __restrict__ beam_scores,
                      int K, int V, int S, int C, float* __restrict__ row_m,
                      float* __restrict__ row_logd, float* __restrict__ scores,
                      int64_t* __restrict__ parents, int64_t* __restrict__ tokens) {
  const int b = blockIdx.x;
  // Row log-sum-exps go through global scratch rather than shared memory so
  // that any K fits; __syncthreads makes the block's global writes visible.
  for (int j = threadIdx.x; j < K; j += kThreads) {
    const int64_t r = static_cast<int64_t>(b) * K + j;
    row_lse(part_m, part_d, r, S, row_m[r], row_logd[r]);
  }
  __syncthreads();

  TopList<N> top;
  top.init();
  const int per_row = S * C;
  const int64_t total = static_cast<int64_t>(K) * per_row;
  const Key* keys = part_keys + static_cast<int64_t>(b) * total;
  for (int64_t i = threadIdx.x; i < total; i += kThreads) {
    const Key k = keys[i];
    if (k == 0) continue;  // empty slot of a short chunk
    const int j = static_cast<int>(i / per_row);
    const int64_t r = static_cast<int64_t>(b) * K + j;
    const float m = row_m[r];
    const float s = m == -INFINITY ? -INFINITY : ((key_value(k) - m) - row_logd[r]) + beam_scores[r];
    top.push(make_key(s, static_cast<unsigned>(j) * static_cast<unsigned>(V) + key_index(k)));
  }
  const int64_t out = static_cast<int64_t>(b) * C;
  block_select(top, C, [&](int c, Key k) {
    const unsigned flat = key_index(k);
    scores[out + c] = key_value(k);
    parents[out + c] = flat / static_cast<unsigned>(V);
    tokens[out + c] = flat % static_cast<unsigned>(V);
  });
}

// Generic path: every score, with its flat index within the batch item.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    beam_scores_kernel(const T* __restrict__ logits, int64_t row_stride, int K, int V, int S,
                       float temperature, const float* __restrict__ part_m,
                       const float* __restrict__ part_d, const float* __restrict__ beam_scores,
                       float* __restrict__ out_scores, int* __restrict__ out_index) {
  const int row = blockIdx.x;
  __shared__ float sh_m, sh_logd;
  if (threadIdx.x == 0) row_lse(part_m, part_d, row, S, sh_m, sh_logd);
  __syncthreads();
  const float m = sh_m, logd = sh_logd, bs = beam_scores[row];
  const bool apply_t = temperature != 1.f;
  const T* p = logits + static_cast<int64_t>(row) * row_stride;
  const int64_t base = static_cast<int64_t>(row) * V;
  const int j = row % K;
  // 64-bit v: v + gridDim.y * kThreads (up to 2^24) passes 2^31 - 1 when V is near it.
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; v < V;
       v += static_cast<int64_t>(gridDim.y) * kThreads) {
    const float x = scale(to_float(p[v]), apply_t, temperature);
    float s = m == -INFINITY ? -INFINITY : ((x - m) - logd) + bs;
    if (s == 0.f) s = 0.f;  // radix sort sees bits: one zero, so -0/+0 tie by index
    out_scores[base + v] = s;
    out_index[base + v] = static_cast<int>(static_cast<int64_t>(j) * V + v);
  }
}

__global__ void segment_offsets_kernel(int* offsets, int B, int per_item) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= B) offsets[i] = i * per_item;
}

__global__ void gather_top_kernel(const float* __restrict__ sorted_scores,
                                  const int* __restrict__ sorted_index, int per_item, int V, int C,
                                  float* __restrict__ scores, int64_t* __restrict__ parents,
                                  int64_t* __restrict__ tokens) {
  // Items along x (up to 2^31 - 1 of them; y stops at 65535), candidates strided
  // over y in 64 bits (C itself may be near 2^31).
  const int b = blockIdx.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t src = static_cast<int64_t>(b) * per_item + c;
    const int64_t dst = static_cast<int64_t>(b) * C + c;
    const int flat = sorted_index[src];
    scores[dst] = sorted_scores[src];
    parents[dst] = flat / V;
    tokens[dst] = flat % V;
  }
}

// ------------------------------------------------------------------ planning

struct Plan {
  bool fast = true;
  int n_cap = 0;  // per-thread list length (template N), 0 on the generic path
  int S = 1, chunk = 0;
  size_t off_m = 0, off_d = 0, off_keys = 0, off_row_m = 0, off_row_logd = 0;
  size_t off_scores_in = 0, off_scores_out = 0, off_index_in = 0, off_index_out = 0;
  size_t off_offsets = 0, off_temp = 0, temp_bytes = 0, total = 0;
};

int current_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1) {
    cudaGetLastError();  // clear: the plan just uses one SM's worth of splits
    sms = 1;
  }
  return sms;
}

int list_cap(int C) {
  int n = 2;
  while (n < C) n *= 2;
  return n;
}

cudaError_t make_plan(int B, int K, int V, int C, Plan& pl) {
  if (B < 1 || K < 1 || V < 1 || C < 1) return cudaErrorInvalidValue;
  const int64_t R = static_cast<int64_t>(B) * K;
  if (static_cast<int64_t>(K) * V >= (int64_t{1} << 31) || C > static_cast<int64_t>(K) * V)
    return cudaErrorInvalidValue;
  pl.fast = C <= kFastMaxC;
  pl.n_cap = pl.fast ? list_cap(C) : 0;
  const int sms = current_sm_count();
  const int64_t want = (static_cast<int64_t>(kBlocksPerSm) * sms + R - 1) / R;
  int cap = std::min(kMaxSplits, std::max(1, V / kMinChunk));
  if (pl.fast) cap = std::min(cap, std::max(1, kMaxKeysPerRow / C));
  int S = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, cap)));
  // Rounding up to the quantum may pass V (one split then covers the row): clamp
  // to V so that the chunk stays an int when V is near 2^31.
  pl.chunk = static_cast<int>(std::min<int64_t>(
      static_cast<int64_t>(ceil_div(ceil_div(V, S), kChunkQuantum)) * kChunkQuantum, V));
  pl.S = ceil_div(V, pl.chunk);  // no empty splits after rounding
  S = pl.S;

  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  pl.off_m = take(sizeof(float) * R * S);
  pl.off_d = take(sizeof(float) * R * S);
  if (pl.fast) {
    pl.off_keys = take(sizeof(Key) * R * S * C);
    pl.off_row_m = take(sizeof(float) * R);
    pl.off_row_logd = take(sizeof(float) * R);
  } else {
    const int64_t n = R * V;
    if (n >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
    pl.off_scores_in = take(sizeof(float) * n);
    pl.off_scores_out = take(sizeof(float) * n);
    pl.off_index_in = take(sizeof(int) * n);
    pl.off_index_out = take(sizeof(int) * n);
    pl.off_offsets = take(sizeof(int) * (B + 1));
    size_t temp = 0;
    const cudaError_t err = cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, temp, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
        static_cast<const int*>(nullptr), static_cast<int*>(nullptr), static_cast<int>(n), B,
        static_cast<const int*>(nullptr), static_cast<const int*>(nullptr));
    if (err != cudaSuccess) return err;
    pl.temp_bytes = temp;
    pl.off_temp = take(temp);
  }
  pl.total = off;
  return cudaSuccess;
}

// Everything a launch needs, so that the dtype and list-length dispatch stays short.
struct Launch {
  const Plan& pl;
  const void* logits;
  int64_t row_stride;
  const float* beam_scores;
  int B, K, V, C;
  float temperature;
  float* scores;
  int64_t* parents;
  int64_t* tokens;
  char* ws;
  cudaStream_t stream;
};

template <typename T, int N>
void launch_partial(const Launch& a) {
  const Plan& pl = a.pl;
  beam_partial_kernel<T, N><<<dim3(a.B * a.K, pl.S), kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.logits), a.row_stride, a.V, pl.chunk, pl.S, a.C, a.temperature,
      a.beam_scores, reinterpret_cast<float*>(a.ws + pl.off_m),
      reinterpret_cast<float*>(a.ws + pl.off_d),
      pl.fast ? reinterpret_cast<Key*>(a.ws + pl.off_keys) : nullptr);
}

template <typename T>
void launch_partial_any(const Launch& a) {
  switch (a.pl.n_cap) {
    case 0: launch_partial<T, 0>(a); break;
    case 2: launch_partial<T, 2>(a); break;
    case 4: launch_partial<T, 4>(a); break;
    case 8: launch_partial<T, 8>(a); break;
    case 16: launch_partial<T, 16>(a); break;
    default: launch_partial<T, 32>(a); break;
  }
}

template <int N>
void launch_merge(const Launch& a) {
  const Plan& pl = a.pl;
  beam_merge_kernel<N><<<a.B, kThreads, 0, a.stream>>>(
      reinterpret_cast<const float*>(a.ws + pl.off_m), reinterpret_cast<const float*>(a.ws + pl.off_d),
      reinterpret_cast<const Key*>(a.ws + pl.off_keys), a.beam_scores, a.K, a.V, pl.S, a.C,
      reinterpret_cast<float*>(a.ws + pl.off_row_m), reinterpret_cast<float*>(a.ws + pl.off_row_logd),
      a.scores, a.parents, a.tokens);
}

template <typename T>
cudaError_t launch_generic(const Launch& a) {
  const Plan& pl = a.pl;
  const int R = a.B * a.K;
  const int per_item = a.K * a.V;
  float* s_in = reinterpret_cast<float*>(a.ws + pl.off_scores_in);
  float* s_out = reinterpret_cast<float*>(a.ws + pl.off_scores_out);
  int* i_in = reinterpret_cast<int*>(a.ws + pl.off_index_in);
  int* i_out = reinterpret_cast<int*>(a.ws + pl.off_index_out);
  int* offsets = reinterpret_cast<int*>(a.ws + pl.off_offsets);
  const int blocks_v = std::min(ceil_div(a.V, kThreads), 65535);
  beam_scores_kernel<T><<<dim3(R, blocks_v), kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.logits), a.row_stride, a.K, a.V, pl.S, a.temperature,
      reinterpret_cast<const float*>(a.ws + pl.off_m), reinterpret_cast<const float*>(a.ws + pl.off_d),
      a.beam_scores, s_in, i_in);
  segment_offsets_kernel<<<ceil_div(a.B + 1, kThreads), kThreads, 0, a.stream>>>(offsets, a.B, per_item);
  size_t temp = pl.temp_bytes;
  const cudaError_t err = cub::DeviceSegmentedRadixSort::SortPairsDescending(
      // const int* offsets: the same instantiation as make_plan's size query.
      a.ws + pl.off_temp, temp, s_in, s_out, i_in, i_out, R * a.V, a.B,
      static_cast<const int*>(offsets), static_cast<const int*>(offsets + 1), 0,
      static_cast<int>(sizeof(float) * 8), a.stream);
  if (err != cudaSuccess) return err;
  gather_top_kernel<<<dim3(a.B, std::min(ceil_div(a.C, kThreads), 65535)), kThreads, 0, a.stream>>>(
      s_out, i_out, per_item, a.V, a.C, a.scores, a.parents, a.tokens);
  return cudaSuccess;
}

}  // namespace

size_t beam_topk_workspace_bytes(int B, int K, int V, int C) {
  Plan pl;
  return make_plan(B, K, V, C, pl) == cudaSuccess ? pl.total : 0;
}

cudaError_t launch_beam_topk(const void* logits, int dtype_code, int64_t row_stride,
                             const float* beam_scores, int B, int K, int V, int C,
                             float temperature, float* scores, int64_t* parents,
                             int64_t* tokens, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  Plan pl;
  cudaError_t err = make_plan(B, K, V, C, pl);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < pl.total || (pl.total > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  if (dtype_code != kFloat32 && dtype_code != kFloat16 && dtype_code != kBFloat16)
    return cudaErrorInvalidValue;
  const Launch a{pl, logits, row_stride, beam_scores, B, K, V, C, temperature,
                 scores, parents, tokens, static_cast<char*>(workspace), stream};

  switch (dtype_code) {
    case kFloat32: launch_partial_any<float>(a); break;
    case kFloat16: launch_partial_any<__half>(a); break;
    default: launch_partial_any<__nv_bfloat16>(a); break;
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  if (pl.fast) {
    switch (pl.n_cap) {
      case 2: launch_merge<2>(a); break;
      case 4: launch_merge<4>(a); break;
      case 8: launch_merge<8>(a); break;
      case 16: launch_merge<16>(a); break;
      default: launch_merge<32>(a); break;
    }
    return cudaGetLastError();
  }
  switch (dtype_code) {
    case kFloat32: err = launch_generic<float>(a); break;
    case kFloat16: err = launch_generic<__half>(a); break;
    default: err = launch_generic<__nv_bfloat16>(a); break;
  }
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tts
