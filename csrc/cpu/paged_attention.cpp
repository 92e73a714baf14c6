// paged_attention on CPU: decode attention over a paged KV cache.
//
//   out[i, h] = sum_{t in [lo_i, L_i)} softmax_t(scale * <q[i, h], K_i[t, g]>) V_i[t, g],
//   g = h / (H / Hkv),  K_i[t] = k_cache[block_tables[i, t / P], :, t % P, :],
//   lo_i = max(0, L_i - window) (0 without a window); zeros when the range is empty.
//
// One task per (sequence, kv head): the GQA group's H / Hkv query heads walk the
// sequence's positions together, tile by tile, so each K/V row is read from
// memory once per kv head (and then from L1 for every head of the group). Each
// row keeps an online softmax state (running max m, running sum l, unnormalised
// accumulator acc), updated once per tile, never per token.
//
// Shared prefix (prefix_lens): consecutive sequences with the same clamped prefix
// length p = min(prefix_lens[i], L_i) > 0 and the same first ceil(p / P) table
// entries form a group. A first pass, one task per (group, kv head), runs every
// query row of the group over positions [0, p) (each row masked by its own
// window start), reading the shared blocks once per group. The second pass, per
// (sequence, kv head), continues the same online softmax state over [max(p, lo), L):
// continuing the state is exactly the log-sum-exp merge of the two partial
// softmaxes. prefix_lens never changes the result, only which reads are shared.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

namespace tts {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Positions per tile: 32 K rows plus 32 V rows of D = 128 floats are 32 KB, about
// an L1 data cache, so the GQA heads after the first read them from L1. A
// multiple of 8: scores are computed 8 tokens at a time.
constexpr int64_t kTile = 32;
// Shared-prefix pass: positions per chunk (256 K and V rows of D = 128 fp32 are
// 256 KB, within L2) and query rows per slice (16 accumulators of D = 128 are
// 8 KB, within L1).
constexpr int64_t kChunk = 256;
constexpr int64_t kRowSlice = 16;

// ---- vector helpers: portable bodies ---------------------------------------

// out[j] = <q, k[j]> for j < 8.
inline void dot8_scalar(const float* q, const float* const* k, int64_t D, float* out) {
  for (int j = 0; j < 8; ++j) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * k[j][d];
    out[j] = s;
  }
}

template <typename T>
void to_f32_scalar(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// p[t] = exp(s[t] - m) (exactly 0 where s[t] = -inf); returns sum_t p[t]. m is finite.
inline float exp_store_scalar(const float* s, int64_t n, float m, float* p) {
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = s[t] == kNegInf ? 0.0f : exp_nonpos_scalar(s[t] - m);
    sum += p[t];
  }
  return sum;
}

// acc[0:D] = alpha * acc + sum_t p[t] * v[t][0:D].
inline void acc_update_scalar(float* acc, float alpha, const float* p, const float* const* v, int64_t tn,
                              int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    float a = acc[d] * alpha;
    for (int64_t t = 0; t < tn; ++t) a += p[t] * v[t][d];
    acc[d] = a;
  }
}

#ifdef TTS_X86
// ---- AVX2 bodies -----------------------------------------------------------

// Eight dot products at once, reduced with a transposing hadd tree: one
// horizontal reduction per 8 tokens instead of one per token.
TTS_AVX2 void dot8_avx2(const float* q, const float* const* k, int64_t D, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + d), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + d), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + d), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + d), a3);
    a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[4] + d), a4);
    a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[5] + d), a5);
    a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[6] + d), a6);
    a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[7] + d), a7);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out, sum);
  for (; d < D; ++d)  // head_dim not a multiple of 8
    for (int j = 0; j < 8; ++j) out[j] += q[d] * k[j][d];
}

template <typename T>
TTS_AVX2 void to_f32_avx2(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  to_f32_scalar(src + i, dst + i, n - i);
}

TTS_AVX2 float exp_store_avx2(const float* s, int64_t n, float m, float* p) {
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(s + t);
    __m256 e = exp_nonpos_avx2(_mm256_sub_ps(x, mv));
    e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), e);  // masked positions weigh exactly 0
    _mm256_storeu_ps(p + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += lanes[k];
  return sum + exp_store_scalar(s + t, n - t, m, p + t);
}

TTS_AVX2 void acc_update_avx2(float* acc, float alpha, const float* p, const float* const* v, int64_t tn,
                              int64_t D) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t d = 0;
  // Two 8-wide columns at a time: the accumulators stay in registers over the tile.
  for (; d + 16 <= D; d += 16) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + d), av);
    __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 8), av);
    for (int64_t t = 0; t < tn; ++t) {
      const __m256 pt = _mm256_set1_ps(p[t]);
      a0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v[t] + d), a0);
      a1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v[t] + d + 8), a1);
    }
    _mm256_storeu_ps(acc + d, a0);
    _mm256_storeu_ps(acc + d + 8, a1);
  }
  for (; d + 8 <= D; d += 8) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + d), av);
    for (int64_t t = 0; t < tn; ++t) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v[t] + d), a0);
    _mm256_storeu_ps(acc + d, a0);
  }
  for (; d < D; ++d) {
    float a = acc[d] * alpha;
    for (int64_t t = 0; t < tn; ++t) a += p[t] * v[t][d];
    acc[d] = a;
  }
}
#endif  // TTS_X86

// ---- dispatch --------------------------------------------------------------

inline void dot8(const float* q, const float* const* k, int64_t D, float* out) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return dot8_avx2(q, k, D, out);
#endif
  dot8_scalar(q, k, D, out);
}

template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return to_f32_avx2(src, dst, n);
#endif
  to_f32_scalar(src, dst, n);
}

inline float exp_store(const float* s, int64_t n, float m, float* p) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return exp_store_avx2(s, n, m, p);
#endif
  return exp_store_scalar(s, n, m, p);
}

inline void acc_update(float* acc, float alpha, const float* p, const float* const* v, int64_t tn, int64_t D) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return acc_update_avx2(acc, alpha, p, v, tn, D);
#endif
  acc_update_scalar(acc, alpha, p, v, tn, D);
}

// ---- the kernel ------------------------------------------------------------

struct Geometry {
  int64_t n, H, Hkv, GQ, P, D, num_blocks, max_blocks;
};

// Online-softmax state of every query row (index i * H + h), all in fp32.
struct State {
  const float* q;  // [n*H, D] scaled queries
  float* m;        // [n*H] running max
  float* l;        // [n*H] running sum of exp(s - m)
  float* acc;      // [n*H, D] running sum of exp(s - m) * v
};

// Per-thread tile buffers.
struct Scratch {
  std::vector<float> kbuf, vbuf;  // converted K/V rows (16-bit caches only)
  const float* kr[kTile];
  const float* vr[kTile];
  float s[kTile], p[kTile];
  explicit Scratch(int64_t D) : kbuf(kTile * D), vbuf(kTile * D) {}
};

// Rows rows[0:R] attend to positions [begin, end) of the sequence whose block
// table row is `table`, on kv head h. lo (optional) masks positions below
// lo[r] for row r. Updates the rows' state.
template <typename T>
void attend(const Geometry& g, const State& st, const int64_t* rows, const int32_t* lo, int64_t R, const T* kc,
            const T* vc, const int32_t* table, int64_t h, int64_t begin, int64_t end, Scratch& sc) {
  const int64_t D = g.D;
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t tn = std::min(kTile, end - t0);
    for (int64_t t = 0; t < tn; ++t) {
      const int64_t pos = t0 + t;
      const int64_t row = ((static_cast<int64_t>(table[pos / g.P]) * g.Hkv + h) * g.P + pos % g.P) * D;
      if constexpr (std::is_same_v<T, float>) {
        sc.kr[t] = kc + row;
        sc.vr[t] = vc + row;
      } else {
        to_f32(kc + row, sc.kbuf.data() + t * D, D);
        to_f32(vc + row, sc.vbuf.data() + t * D, D);
        sc.kr[t] = sc.kbuf.data() + t * D;
        sc.vr[t] = sc.vbuf.data() + t * D;
      }
    }
    const int64_t tn8 = (tn + 7) / 8 * 8;
    for (int64_t t = tn; t < tn8; ++t) sc.kr[t] = sc.kr[0];  // padding lanes: computed, never used
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = rows[r];
      for (int64_t t = 0; t < tn8; t += 8) dot8(st.q + row * D, sc.kr + t, D, sc.s + t);
      if (lo != nullptr)
        for (int64_t t = 0; t < tn && t0 + t < lo[r]; ++t) sc.s[t] = kNegInf;
      float mt = kNegInf;
      for (int64_t t = 0; t < tn; ++t) mt = std::max(mt, sc.s[t]);
      if (mt == kNegInf) continue;  // the whole tile is before this row's window
      const float m_old = st.m[row];
      const float m_new = std::max(m_old, mt);
      const float alpha = m_old == kNegInf ? 0.0f : std::exp(m_old - m_new);
      st.l[row] = st.l[row] * alpha + exp_store(sc.s, tn, m_new, sc.p);
      acc_update(st.acc + row * D, alpha, sc.p, sc.vr, tn, D);
      st.m[row] = m_new;
    }
  }
}

template <typename T>
void paged_attention_kernel(const Geometry& g, const T* q, const T* kc, const T* vc, const int32_t* bt,
                            const int32_t* lens, const int32_t* plens, float scale, std::optional<int64_t> window,
                            float* out) {
  const int64_t n = g.n, H = g.H, D = g.D, P = g.P, GQ = g.GQ;
  // Per-sequence plan; the table entries a sequence needs are checked before any is read.
  std::vector<int32_t> L(n), lo(n), pre(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t Li = lens[i];
    TORCH_CHECK_VALUE(Li >= 0 && Li <= g.max_blocks * P, "paged_attention: seq_lens[", i, "] = ", Li,
                      " is out of range [0, max_blocks * block_size = ", g.max_blocks * P, "]");
    for (int64_t j = 0; j < (Li + P - 1) / P; ++j) {
      const int64_t id = bt[i * g.max_blocks + j];
      TORCH_CHECK_VALUE(id >= 0 && id < g.num_blocks, "paged_attention: block_tables[", i, ", ", j, "] = ", id,
                        " is out of range [0, num_blocks = ", g.num_blocks, ") (seq_lens[", i, "] = ", Li,
                        " needs ", (Li + P - 1) / P, " blocks)");
    }
    L[i] = static_cast<int32_t>(Li);
    lo[i] = window ? static_cast<int32_t>(std::max<int64_t>(0, Li - *window)) : 0;
    if (plens != nullptr) {
      TORCH_CHECK_VALUE(plens[i] >= 0, "paged_attention: prefix_lens[", i, "] = ", plens[i], " is negative");
      pre[i] = std::min<int32_t>(plens[i], L[i]);
    }
  }
  // Groups: maximal runs sharing the prefix length and its block ids.
  std::vector<std::pair<int64_t, int64_t>> groups;
  if (plens != nullptr) {
    for (int64_t i = 0; i < n;) {
      const int64_t nb = (pre[i] + P - 1) / P;
      int64_t j = i + 1;
      while (j < n && pre[i] > 0 && pre[j] == pre[i] &&
             std::memcmp(bt + i * g.max_blocks, bt + j * g.max_blocks, nb * sizeof(int32_t)) == 0)
        ++j;
      if (j - i >= 2) {
        groups.emplace_back(i, j);
      } else {
        pre[i] = 0;  // alone: the per-sequence pass reads its prefix itself
      }
      i = j;
    }
  }

  std::vector<float> qf(n * H * D), m(n * H, kNegInf), l(n * H, 0.0f);
  for (int64_t r = 0; r < n * H; ++r) {
    to_f32(q + r * D, qf.data() + r * D, D);
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= scale;  // scale once per query, not per score
  }
  std::fill(out, out + n * H * D, 0.0f);
  const State st{qf.data(), m.data(), l.data(), out};

  // Work per task, for the grain: a (sequence, kv head) reads about GQ * D per attended position.
  int64_t positions = 0;
  for (int64_t i = 0; i < n; ++i) positions += L[i] - lo[i];
  const int64_t per_task = GQ * D * std::max<int64_t>(1, positions / std::max<int64_t>(1, n));

  // Pass 1: the shared prefix of each group, once per (group, kv head).
  const int64_t ng = static_cast<int64_t>(groups.size());
  at::parallel_for(0, ng * g.Hkv, tts::grain_for(per_task), [&](int64_t b, int64_t e) {
    Scratch sc(D);
    std::vector<int64_t> rows;
    std::vector<int32_t> row_lo;
    for (int64_t task = b; task < e; ++task) {
      const auto [gs, ge] = groups[task / g.Hkv];
      const int64_t h = task % g.Hkv;
      rows.clear();
      row_lo.clear();
      int32_t begin = pre[gs];
      for (int64_t i = gs; i < ge; ++i) {
        begin = std::min(begin, lo[i]);
        for (int64_t k = 0; k < GQ; ++k) {
          rows.push_back(i * H + h * GQ + k);
          row_lo.push_back(lo[i]);
        }
      }
      // Token chunks that stay in L2, row slices whose state stays in L1: the
      // group's rows would otherwise stream their accumulators through L1 per tile.
      const int64_t R = static_cast<int64_t>(rows.size());
      for (int64_t c0 = begin; c0 < pre[gs]; c0 += kChunk) {
        const int64_t c1 = std::min<int64_t>(pre[gs], c0 + kChunk);
        for (int64_t r0 = 0; r0 < R; r0 += kRowSlice)
          attend(g, st, rows.data() + r0, row_lo.data() + r0, std::min(kRowSlice, R - r0), kc, vc,
                 bt + gs * g.max_blocks, h, c0, c1, sc);
      }
    }
  });

  // Pass 2: each sequence's own positions, continuing the prefix state; then normalise.
  at::parallel_for(0, n * g.Hkv, tts::grain_for(per_task), [&](int64_t b, int64_t e) {
    Scratch sc(D);
    int64_t rows[256];
    for (int64_t task = b; task < e; ++task) {
      const int64_t i = task / g.Hkv, h = task % g.Hkv;
      for (int64_t k0 = 0; k0 < GQ; k0 += 256) {  // more than 256 heads per kv head: in slices
        const int64_t R = std::min<int64_t>(256, GQ - k0);
        for (int64_t k = 0; k < R; ++k) rows[k] = i * H + h * GQ + k0 + k;
        attend(g, st, rows, nullptr, R, kc, vc, bt + i * g.max_blocks, h, std::max(pre[i], lo[i]), L[i], sc);
        for (int64_t k = 0; k < R; ++k) {
          float* a = out + rows[k] * D;
          const float inv = l[rows[k]] > 0.0f ? 1.0f / l[rows[k]] : 0.0f;  // empty range: zeros
          for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        }
      }
    }
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& query_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in, double scale,
                               std::optional<int64_t> sliding_window, const std::optional<at::Tensor>& prefix_lens_in) {
  TORCH_CHECK(query_in.dim() == 3, "paged_attention: query must be 3-D [n, num_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_attention: k_cache and v_cache must be 4-D [num_blocks, num_kv_heads, block_size, head_dim] "
              "of the same shape");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: k_cache and v_cache must be contiguous");
  TORCH_CHECK(query_in.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention: query, k_cache and v_cache must have the same dtype");
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.scalar_type() == at::kInt,
              "paged_attention: block_tables must be a 2-D int32 tensor");
  TORCH_CHECK(seq_lens_in.dim() == 1 && seq_lens_in.scalar_type() == at::kInt,
              "paged_attention: seq_lens must be a 1-D int32 tensor");
  const int64_t n = query_in.size(0), H = query_in.size(1), D = query_in.size(2);
  const int64_t Hkv = k_cache.size(1), P = k_cache.size(2);
  TORCH_CHECK(block_tables_in.size(0) == n && seq_lens_in.size(0) == n,
              "paged_attention: block_tables and seq_lens must have one row per query");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "paged_attention: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k_cache.size(3) == D, "paged_attention: k_cache head_dim must equal query head_dim");
  TORCH_CHECK(P >= 1, "paged_attention: block_size must be >= 1");
  TORCH_CHECK(!sliding_window || *sliding_window >= 1, "paged_attention: sliding_window must be >= 1");
  at::Tensor prefix_lens;
  if (prefix_lens_in) {
    TORCH_CHECK(prefix_lens_in->dim() == 1 && prefix_lens_in->scalar_type() == at::kInt &&
                    prefix_lens_in->size(0) == n,
                "paged_attention: prefix_lens must be a 1-D int32 tensor with one entry per query");
    prefix_lens = prefix_lens_in->contiguous();
  }
  const at::Tensor query = query_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  at::Tensor out = at::empty({n, H, D}, query.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(query.scalar_type());
  const Geometry g{n, H, Hkv, H / Hkv, P, D, k_cache.size(0), block_tables.size(1)};
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* plens = prefix_lens.defined() ? prefix_lens.data_ptr<int32_t>() : nullptr;
  const float sc = static_cast<float>(scale);
  float* o = out.data_ptr<float>();
  switch (query.scalar_type()) {
    case at::kFloat:
      paged_attention_kernel(g, query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt,
                             lens, plens, sc, sliding_window, o);
      break;
    case at::kHalf:
      paged_attention_kernel(g, reinterpret_cast<const HalfBits*>(query.data_ptr<at::Half>()),
                             reinterpret_cast<const HalfBits*>(k_cache.data_ptr<at::Half>()),
                             reinterpret_cast<const HalfBits*>(v_cache.data_ptr<at::Half>()), bt, lens, plens, sc,
                             sliding_window, o);
      break;
    case at::kBFloat16:
      paged_attention_kernel(g, reinterpret_cast<const BF16Bits*>(query.data_ptr<at::BFloat16>()),
                             reinterpret_cast<const BF16Bits*>(k_cache.data_ptr<at::BFloat16>()),
                             reinterpret_cast<const BF16Bits*>(v_cache.data_ptr<at::BFloat16>()), bt, lens, plens,
                             sc, sliding_window, o);
      break;
    default:
      TORCH_CHECK(false, "paged_attention: query must be float32, float16 or bfloat16, got ", query.scalar_type());
  }
  return query.scalar_type() == at::kFloat ? out : out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tts, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace tts
