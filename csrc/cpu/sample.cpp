// sample on CPU: temperature, top-k, top-p, min-p and an exponential race with
// counter-based (Philox) uniforms, one row per task. The meaning is
// tts_kernels.reference.sample_ref; this file computes the same thing without
// sorting the vocabulary:
//
//   x = sanitize(logits / T) (NaN, +inf -> -inf), m = max x, e = exp(x - m)
//   top-k : threshold = k-th largest x (a small sorted list for k <= kSmallK,
//           else a count histogram on e's bits and a selection inside one bin)
//   top-p : a 2048-bin histogram of the mass by the float bits of e (16 bins per
//           octave, so a bin spans 4% in e) finds the bin where the cumulative
//           mass from the top reaches top_p * Z_k; only that bin's tokens are
//           sorted, to place the threshold between groups of equal x.
//   min-p : e >= min_p
//   race  : token = argmax over kept v of e_v / E_v, E_v = -log u(seed, offset, r, v)
//
// Every filter keeps an upper set of x, so the kept set is {x >= tau} with the
// min-p test on top; the last pass draws Philox only for 32-token blocks that hold
// a kept token, so a narrow top-p or top-k pays for a few hundred draws, not V.
//
// Confidence statistics (optional, reference.sample_stats_ref) are of the full
// distribution at temperature 1, y = x - m: with Z = sum e, lp = y - log Z
// (log Z = log1p(Z - 1), Z - 1 summed without the maximum's e = 1),
//   confidence   = log Z - mean(k largest y)
//   entropy      = log Z - sum(e * y) / Z
//   self-certainty = log Z - log V - mean(y)
// At T = 1 (and for greedy rows, whose x is unscaled) they reuse x and e of the
// sampling passes: one more pass over the row, tile by tile in L1, which also keeps
// the k largest in a sorted list (SIMD compares against its floor). At T != 1 the
// row is read once more and exponentiated at temperature 1 before the sampler reads it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

namespace tts {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
// Tokens per Philox block: 8 counters (one AVX2 register) x 4 output words.
constexpr int64_t kBlock = 32;
// Elements converted at a time (as in beam_topk: 2 KiB stays in L1).
constexpr int64_t kTile = 512;
// Top-k by insertion into a sorted list up to this k (expected insertions
// ~k ln(V/k), each O(k)); larger k counts a histogram, then selects in one bin.
constexpr int64_t kSmallK = 256;
// Histogram bins: bits(e) >> 19 keeps the exponent and 4 mantissa bits; e <= 1.0
// (bits 0x3F800000) gives bins <= 2032.
constexpr int kBins = 2048;
constexpr int kBinShift = 19;

struct RowParams {
  float temperature;
  int64_t top_k;
  double top_p;
  float min_p;
  uint64_t seed;
  uint64_t offset;
  uint32_t stream;  // the row's place in the random stream (default: its row index)
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- Philox-4x32-10 and the uniform ----------------------------------------

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

inline void philox_scalar(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p1);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

// (2 * (w >> 9) + 1) * 2^-24: exact, in (0, 1), 23 random bits.
inline float uniform_from_word(uint32_t w) { return static_cast<float>(((w >> 9) << 1) | 1u) * 0x1p-24f; }

struct Stream {
  uint32_t row, off_lo, off_hi, k0, k1;
};

inline Stream make_stream(const RowParams& p) {
  return Stream{p.stream, static_cast<uint32_t>(p.offset), static_cast<uint32_t>(p.offset >> 32),
                static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32)};
}

// u for tokens [base, base + 32), base a multiple of 4.
inline void uniforms_scalar(const Stream& s, int64_t base, float* u) {
  for (int i = 0; i < kBlock / 4; ++i) {
    uint32_t c[4] = {static_cast<uint32_t>((base >> 2) + i), s.row, s.off_lo, s.off_hi};
    philox_scalar(c, s.k0, s.k1);
    for (int j = 0; j < 4; ++j) u[4 * i + j] = uniform_from_word(c[j]);
  }
}

// -log(u) for u in (0, 1) (normal floats).
inline float neg_log_scalar(float u) { return -std::log(u); }

#ifdef TTS_X86
// hi and lo 32-bit halves of a * b per 32-bit lane.
TTS_AVX2 inline void mulhilo_avx2(__m256i a, __m256i b, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, b);                                          // lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));  // 1,3,5,7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

TTS_AVX2 inline void uniforms_avx2(const Stream& s, int64_t base, float* u) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base >> 2)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(s.row));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(s.off_lo));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(s.off_hi));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  uint32_t k0 = s.k0, k1 = s.k1;
  for (int i = 0; i < 10; ++i) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo_avx2(m0, c0, &hi0, &lo0);
    mulhilo_avx2(m1, c2, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  // Word j of counter i is token 4i + j: a 4x8 transpose into token order.
  const __m256i a = _mm256_unpacklo_epi32(c0, c1), b = _mm256_unpackhi_epi32(c0, c1);
  const __m256i c = _mm256_unpacklo_epi32(c2, c3), d = _mm256_unpackhi_epi32(c2, c3);
  const __m256i p = _mm256_unpacklo_epi64(a, c), q = _mm256_unpackhi_epi64(a, c);
  const __m256i r = _mm256_unpacklo_epi64(b, d), t = _mm256_unpackhi_epi64(b, d);
  const __m256i words[4] = {_mm256_permute2x128_si256(p, q, 0x20), _mm256_permute2x128_si256(r, t, 0x20),
                            _mm256_permute2x128_si256(p, q, 0x31), _mm256_permute2x128_si256(r, t, 0x31)};
  const __m256i one = _mm256_set1_epi32(1);
  for (int j = 0; j < 4; ++j) {
    const __m256i odd = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(words[j], 9), 1), one);
    _mm256_storeu_ps(u + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(0x1p-24f)));
  }
}

// -log(u) for normal u > 0: u = f * 2^k, f in [sqrt(1/2), sqrt(2)), log f by a
// degree-9 polynomial in t = f - 1 (exact by Sterbenz), ln 2 in two parts.
TTS_AVX2 inline __m256 neg_log_avx2(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256 k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 f = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(f, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  k = _mm256_sub_ps(k, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  const __m256 t = _mm256_add_ps(_mm256_sub_ps(f, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, f));
  const __m256 z = _mm256_mul_ps(t, t);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
  y = _mm256_fmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  const __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(0.693359375f), _mm256_add_ps(t, y));
  return _mm256_sub_ps(_mm256_setzero_ps(), r);
}

TTS_AVX2 inline void exponentials_avx2(const Stream& s, int64_t base, float* E) {
  uniforms_avx2(s, base, E);
  for (int j = 0; j < kBlock; j += 8) _mm256_storeu_ps(E + j, neg_log_avx2(_mm256_loadu_ps(E + j)));
}

TTS_AVX2 inline void exp_tile_avx2(const float* x, float* e, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(e + i, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
  for (; i < n; ++i) e[i] = exp_nonpos_scalar(x[i] - m);
}
#endif  // TTS_X86

// E = -log u for tokens [base, base + 32) into E[0:32).
inline void exponentials(const Stream& s, int64_t base, float* E) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return exponentials_avx2(s, base, E);
#endif
  uniforms_scalar(s, base, E);
  for (int j = 0; j < kBlock; ++j) E[j] = neg_log_scalar(E[j]);
}

inline void exp_tile(const float* x, float* e, int64_t n, float m) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return exp_tile_avx2(x, e, n, m);
#endif
  for (int64_t i = 0; i < n; ++i) e[i] = exp_nonpos_scalar(x[i] - m);
}

// ---- thresholds ------------------------------------------------------------

// k-th largest of x[0:V) (0 < k < V; e = exp(x - m)); -inf when fewer than k are finite.
float kth_largest(const float* x, const float* e, int64_t V, int64_t k, std::vector<float>& scratch) {
  if (k > kSmallK) {
    // Count tokens per histogram bin of e's bits (e is monotone in x, so a
    // higher bin holds only larger x), find the bin holding the k-th largest,
    // and select inside that bin only.
    std::vector<int64_t> cnt(kBins, 0);
    for (int64_t i = 0; i < V; ++i) ++cnt[float_bits(e[i]) >> kBinShift];
    int64_t above = 0;
    int b = kBins - 1;
    for (; b > 0 && above + cnt[b] < k; --b) above += cnt[b];
    scratch.clear();
    for (int64_t i = 0; i < V; ++i) {
      if (static_cast<int>(float_bits(e[i]) >> kBinShift) == b) scratch.push_back(x[i]);
    }
    const int64_t j = k - above - 1;
    std::nth_element(scratch.begin(), scratch.begin() + j, scratch.end(), std::greater<float>());
    return scratch[j];
  }
  // Sorted descending list of the k largest seen; most tiles hold nothing above
  // its last entry once it is full, which one comparison with the tile max rules out.
  scratch.assign(k, kNegInf);
  float* top = scratch.data();
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    const int64_t n = std::min(kTile, V - t0);
    float tmax = kNegInf;
    for (int64_t i = 0; i < n; ++i) tmax = std::max(tmax, x[t0 + i]);
    if (!(tmax > top[k - 1])) continue;
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[t0 + i];
      if (!(v > top[k - 1])) continue;
      int64_t pos = k - 1;
      while (pos > 0 && v > top[pos - 1]) {
        top[pos] = top[pos - 1];
        --pos;
      }
      top[pos] = v;
    }
  }
  return top[k - 1];
}

// Smallest kept value of top-p over {x >= tau_k}: keep v iff the mass of kept
// tokens with x_u > x_v is < top_p * (their total mass). Returns m when only the
// most probable group survives, -inf when nothing is cut.
float top_p_threshold(const float* x, const float* e, int64_t V, float tau_k, double top_p,
                      std::vector<double>& hist, std::vector<std::pair<float, float>>& group) {
  hist.assign(kBins, 0.0);
  double z = 0.0;
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    const int64_t n = std::min(kTile, V - t0);
    for (int64_t i = t0; i < t0 + n; ++i) {
      if (x[i] >= tau_k && x[i] != kNegInf) {
        hist[float_bits(e[i]) >> kBinShift] += e[i];
        z += e[i];
      }
    }
  }
  const double P = top_p * z;
  double above = 0.0;
  int b = kBins - 1;
  for (; b >= 0; --b) {
    if (above + hist[b] >= P) break;
    above += hist[b];
  }
  if (b < 0) return kNegInf;  // rounding left the whole mass below P: nothing is cut
  group.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] >= tau_k && x[i] != kNegInf && static_cast<int>(float_bits(e[i]) >> kBinShift) == b)
      group.emplace_back(x[i], e[i]);
  }
  std::sort(group.begin(), group.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
  // Walk groups of equal x from the top: a group is kept iff the mass before it is < P.
  float tau = kPosInf;
  bool kept_any = false;
  double mass = above;
  for (size_t i = 0; i < group.size();) {
    const float gx = group[i].first;
    if (!(mass < P)) {
      // Tokens above this group (higher bins, or earlier groups) are kept; it is not.
      if (!kept_any) tau = std::nextafter(gx, kPosInf);
      break;
    }
    tau = gx;
    kept_any = true;
    for (; i < group.size() && group[i].first == gx; ++i) mass += group[i].second;
  }
  return tau;
}

// ---- confidence statistics -------------------------------------------------

// The k largest values seen, sorted descending (k <= kSmallK; -inf until filled), fed
// in the statistics pass: a value enters only above floor(), which after the first
// tiles few do (expected insertions ~k ln(V/k)).
struct TopK {
  float* top = nullptr;
  int64_t k = 0;
  void reset(std::vector<float>& buf, int64_t kk) {
    buf.assign(kk, kNegInf);
    top = buf.data();
    k = kk;
  }
  float floor() const { return top[k - 1]; }
  void offer(float v) {
    if (!(v > top[k - 1])) return;
    int64_t pos = k - 1;
    while (pos > 0 && v > top[pos - 1]) {
      top[pos] = top[pos - 1];
      --pos;
    }
    top[pos] = v;
  }
};

// Sums over one tile of y = x - m (m finite), split so that log Z = log1p(Z - 1) keeps
// its precision when one token holds nearly all the mass: over the tokens below the
// maximum with y >= -87, zr += e and s += e * y; nmax += #(x == m) (each e = 1, y = 0);
// sy += y over all tokens (-inf when one is -inf). Below -87 exp_nonpos clamps (its
// e would be exp(-87), not exp(y)), and a true term there is < 1.4e-36: it counts 0.
// With topk, the tile's values are offered to it.
inline void stats_tile_scalar(const float* x, const float* e, int64_t n, float m, float* zr, float* s, float* sy,
                              int64_t* nmax, TopK* topk) {
  float a = 0.0f, b = 0.0f, c = 0.0f;
  int64_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] - m;
    c += y;
    if (x[i] == m) {
      ++top;
    } else if (y >= -87.0f) {
      a += e[i];
      b += e[i] * y;
    }
    if (topk != nullptr) topk->offer(x[i]);
  }
  *zr = a;
  *s = b;
  *sy = c;
  *nmax += top;
}

#ifdef TTS_X86
TTS_AVX2 inline float hsum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float t = 0.0f;
  for (int k = 0; k < 8; ++k) t += lanes[k];
  return t;
}

template <bool kTop>
TTS_AVX2 inline void stats_tile_avx2(const float* x, const float* e, int64_t n, float m, float* zr, float* s,
                                     float* sy, int64_t* nmax, TopK* topk) {
  const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f);
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps();
  __m256 floor = _mm256_set1_ps(kTop ? topk->floor() : 0.0f);
  int64_t top = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 y = _mm256_sub_ps(xv, mv);
    const __m256 is_max = _mm256_cmp_ps(xv, mv, _CMP_EQ_OQ);
    const __m256 rest = _mm256_andnot_ps(is_max, _mm256_cmp_ps(y, lo, _CMP_GE_OQ));
    const __m256 ev = _mm256_and_ps(_mm256_loadu_ps(e + i), rest);
    a = _mm256_add_ps(a, ev);
    b = _mm256_fmadd_ps(ev, _mm256_and_ps(y, rest), b);  // masked lanes: 0 * 0, never 0 * -inf
    c = _mm256_add_ps(c, y);
    top += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(is_max)));
    if (kTop) {
      unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(xv, floor, _CMP_GT_OQ)));
      if (bits != 0) {
        for (; bits != 0; bits &= bits - 1) topk->offer(x[i + __builtin_ctz(bits)]);
        floor = _mm256_set1_ps(topk->floor());
      }
    }
  }
  float ta, tb, tc;
  stats_tile_scalar(x + i, e + i, n - i, m, &ta, &tb, &tc, nmax, kTop ? topk : nullptr);
  *zr = hsum8(a) + ta;
  *s = hsum8(b) + tb;
  *sy = hsum8(c) + tc;
  *nmax += top;
}
#endif  // TTS_X86

inline void stats_tile(const float* x, const float* e, int64_t n, float m, float* zr, float* s, float* sy,
                       int64_t* nmax, TopK* topk) {
#ifdef TTS_X86
  if (cpu_has_avx2()) {
    if (topk != nullptr) return stats_tile_avx2<true>(x, e, n, m, zr, s, sy, nmax, topk);
    return stats_tile_avx2<false>(x, e, n, m, zr, s, sy, nmax, nullptr);
  }
#endif
  stats_tile_scalar(x, e, n, m, zr, s, sy, nmax, topk);
}

// Confidence, entropy and self-certainty of one row at temperature 1 into out[0:3]:
// x[0:V) sanitized logits, m = max x; e[0:V) holds exp(x - m) when have_e, else it is
// scratch space that this fills. No finite logit (m = -inf): NaN, NaN, NaN.
// One pass, tile by tile (exp if needed, the sums, the top-k list for k <= kSmallK);
// a larger k < V selects its threshold afterwards (kth_largest's histogram).
void row_stats(const float* x, float* e, bool have_e, int64_t V, float m, int64_t k, std::vector<float>& scratch,
               float* out) {
  if (m == kNegInf) {
    out[0] = out[1] = out[2] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  k = std::max<int64_t>(1, std::min(k, V));
  TopK list;
  const bool small = k < V && k <= kSmallK;
  if (small) list.reset(scratch, k);
  // Tile sums in float (SIMD lanes), tiles summed in double.
  double zr = 0.0, s = 0.0, sy = 0.0;
  int64_t nmax = 0;
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    const int64_t n = std::min(kTile, V - t0);
    if (!have_e) exp_tile(x + t0, e + t0, n, m);
    float tz, ts, tsy;
    stats_tile(x + t0, e + t0, n, m, &tz, &ts, &tsy, &nmax, small ? &list : nullptr);
    zr += tz;
    s += ts;
    sy += tsy;
  }
  double top = 0.0;  // sum of the k largest y (-inf when fewer than k are finite)
  if (k == V) {
    top = sy;
  } else if (small) {
    for (int64_t i = 0; i < k; ++i) top += static_cast<double>(list.top[i]) - m;
  } else {  // those above the k-th largest value, then copies of it (ties) up to k
    const float tau = kth_largest(x, e, V, k, scratch);
    int64_t above = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (x[i] > tau) {
        top += static_cast<double>(x[i]) - m;
        ++above;
      }
    }
    top += static_cast<double>(k - above) * (static_cast<double>(tau) - m);
  }
  const double z = static_cast<double>(nmax) + zr;
  const double logz = std::log1p(static_cast<double>(nmax - 1) + zr);
  out[0] = static_cast<float>(logz - top / static_cast<double>(k));
  out[1] = static_cast<float>(logz - s / z);
  out[2] = static_cast<float>(logz - std::log(static_cast<double>(V)) - sy / static_cast<double>(V));
}

// ---- one row ---------------------------------------------------------------

struct Work {
  std::vector<float> x, e, scratch;
  std::vector<double> hist;
  std::vector<std::pair<float, float>> group;
};

// One row: its token and logprob; with stats_out, its statistics (row_stats) too.
template <typename T>
void sample_row(const T* row, int64_t V, int64_t r, const RowParams& p, Work& w, int64_t* tok_out, float* lp_out,
                int64_t stats_k, float* stats_out) {
  const int64_t Vp = (V + kBlock - 1) / kBlock * kBlock;
  w.x.resize(Vp);
  w.e.resize(Vp);
  float* x = w.x.data();
  float* e = w.e.data();
  const bool greedy = !(p.temperature > 0.0f);
  const bool scale = !greedy && p.temperature != 1.0f;
  float m = kNegInf;
  if (stats_out != nullptr && scale) {
    // x / T is not the temperature-1 row: read the row unscaled first (x, e are free until the load below).
    for (int64_t t0 = 0; t0 < V; t0 += kTile) {
      const int64_t n = std::min(kTile, V - t0);
      m = std::max(m, load_tile(row + t0, x + t0, n, 1.0f, false));
    }
    row_stats(x, e, false, V, m, stats_k, w.scratch, stats_out);
    m = kNegInf;
  }
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    const int64_t n = std::min(kTile, V - t0);
    m = std::max(m, load_tile(row + t0, x + t0, n, p.temperature, scale));
  }
  std::fill(x + V, x + Vp, kNegInf);
  // Unscaled (T = 1 or greedy), x is the temperature-1 row: the statistics read it here.
  const bool stats_here = stats_out != nullptr && !scale;
  if (m == kNegInf) {  // no finite logit: token 0, logprob -inf
    if (stats_here) row_stats(x, e, false, V, m, stats_k, w.scratch, stats_out);
    *tok_out = 0;
    *lp_out = kNegInf;
    return;
  }
  if (greedy) {
    int64_t i = 0;
    while (x[i] != m) ++i;  // the first maximum
    *tok_out = i;
    *lp_out = 0.0f;
    if (stats_here) row_stats(x, e, false, V, m, stats_k, w.scratch, stats_out);
    return;
  }
  for (int64_t t0 = 0; t0 < V; t0 += kTile) exp_tile(x + t0, e + t0, std::min(kTile, V - t0), m);
  std::fill(e + V, e + Vp, 0.0f);
  if (stats_here) row_stats(x, e, true, V, m, stats_k, w.scratch, stats_out);

  float tau = kNegInf;
  if (p.top_k > 0 && p.top_k < V) tau = kth_largest(x, e, V, p.top_k, w.scratch);
  if (!(p.top_p >= 1.0)) tau = std::max(tau, std::min(m, top_p_threshold(x, e, V, tau, p.top_p, w.hist, w.group)));
  tau = std::min(tau, m);
  // min-p: e >= min_p, the most probable group always in; off when min_p <= 0 (or NaN).
  const float min_p = p.min_p > 0.0f ? p.min_p : kNegInf;

  const Stream s = make_stream(p);
  alignas(32) float u[kBlock];
  float best = -1.0f;
  int64_t tok = 0;
  double z = 0.0;
  for (int64_t base = 0; base < Vp; base += kBlock) {
    bool any = false;
    for (int64_t i = base; i < base + kBlock; ++i) {
      any |= x[i] >= tau && x[i] != kNegInf && (e[i] >= min_p || x[i] == m);
    }
    if (!any) continue;
    exponentials(s, base, u);
    for (int64_t i = base; i < base + kBlock; ++i) {
      if (!(x[i] >= tau && x[i] != kNegInf && (e[i] >= min_p || x[i] == m))) continue;
      z += e[i];
      const float score = e[i] / u[i - base];
      if (score > best) {  // strict: the lowest index wins a tie
        best = score;
        tok = i;
      }
    }
  }
  *tok_out = tok;
  *lp_out = (x[tok] - m) - std::log(static_cast<float>(z));
}

template <typename T>
void sample_kernel(const T* logits, int64_t row_stride, int64_t R, int64_t V, const std::vector<RowParams>& params,
                   int64_t* tokens, float* logprobs, int64_t stats_k, float* stats) {
  at::parallel_for(0, R, tts::grain_for(V), [&](int64_t begin, int64_t end) {
    Work w;
    for (int64_t r = begin; r < end; ++r) {
      sample_row(logits + r * row_stride, V, r, params[r], w, tokens + r, logprobs + r, stats_k,
                 stats == nullptr ? nullptr : stats + 3 * r);
    }
  });
}

// Per-row value of an optional [R] or 0-dim tensor, or the scalar.
template <typename S, typename F>
void fill_param(const std::optional<at::Tensor>& t, at::ScalarType dtype, const char* name, int64_t R, F set) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == dtype, "sample: ", name, " must be ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), "sample: ", name, " must be on the CPU like logits");
  TORCH_CHECK(t->dim() == 0 || (t->dim() == 1 && t->size(0) == R), "sample: ", name, " must be 0-dim or [R]");
  const at::Tensor c = t->contiguous();
  const S* d = c.data_ptr<S>();
  for (int64_t r = 0; r < R; ++r) set(r, d[c.dim() == 0 ? 0 : r]);
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits_in, double temperature, int64_t top_k,
                                              double top_p, double min_p, int64_t seed, int64_t offset,
                                              const std::optional<at::Tensor>& temperatures,
                                              const std::optional<at::Tensor>& top_ks,
                                              const std::optional<at::Tensor>& top_ps,
                                              const std::optional<at::Tensor>& min_ps,
                                              const std::optional<at::Tensor>& seeds,
                                              const std::optional<at::Tensor>& offsets,
                                              const std::optional<at::Tensor>& streams, int64_t stats_k,
                                              const std::optional<at::Tensor>& stats) {
  TORCH_CHECK(logits_in.dim() == 2, "sample: logits must be 2-D [R, V]");
  const int64_t R = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(V >= 1, "sample: logits must have at least one column");
  TORCH_CHECK(R < (int64_t(1) << 32) && V < (int64_t(1) << 34), "sample: R must be < 2**32 and V < 2**34");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  std::vector<RowParams> params(R, RowParams{static_cast<float>(temperature), top_k, top_p,
                                             static_cast<float>(min_p), static_cast<uint64_t>(seed),
                                             static_cast<uint64_t>(offset), 0u});
  for (int64_t r = 0; r < R; ++r) params[r].stream = static_cast<uint32_t>(r);
  fill_param<float>(temperatures, at::kFloat, "temperature", R, [&](int64_t r, float v) { params[r].temperature = v; });
  fill_param<int64_t>(top_ks, at::kLong, "top_k", R, [&](int64_t r, int64_t v) { params[r].top_k = v; });
  fill_param<float>(top_ps, at::kFloat, "top_p", R, [&](int64_t r, float v) { params[r].top_p = v; });
  fill_param<float>(min_ps, at::kFloat, "min_p", R, [&](int64_t r, float v) { params[r].min_p = v; });
  fill_param<int64_t>(seeds, at::kLong, "seed", R, [&](int64_t r, int64_t v) { params[r].seed = static_cast<uint64_t>(v); });
  fill_param<int64_t>(offsets, at::kLong, "offset", R,
                      [&](int64_t r, int64_t v) { params[r].offset = static_cast<uint64_t>(v); });
  fill_param<int64_t>(streams, at::kLong, "stream", R,
                      [&](int64_t r, int64_t v) { params[r].stream = static_cast<uint32_t>(v); });
  float* stats_ptr = nullptr;
  if (stats.has_value()) {
    TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->device().is_cpu() && stats->dim() == 2 &&
                    stats->size(0) == R && stats->size(1) == 3 && stats->is_contiguous(),
                "sample: stats must be a contiguous float32 [R, 3] tensor on the CPU");
    stats_ptr = stats->data_ptr<float>();
  }
  auto tokens = at::empty({R}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({R}, logits.options().dtype(at::kFloat));
  const int64_t rs = logits.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_kernel(logits.data_ptr<float>(), rs, R, V, params, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                    stats_k, stats_ptr);
      break;
    case at::kHalf:
      sample_kernel(reinterpret_cast<const HalfBits*>(logits.data_ptr<at::Half>()), rs, R, V, params,
                    tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), stats_k, stats_ptr);
      break;
    case at::kBFloat16:
      sample_kernel(reinterpret_cast<const BF16Bits*>(logits.data_ptr<at::BFloat16>()), rs, R, V, params,
                    tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), stats_k, stats_ptr);
      break;
    default:
      TORCH_CHECK(false, "sample: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tts, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace tts
