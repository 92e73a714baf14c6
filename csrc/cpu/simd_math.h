// Vectorised tile helpers for the CPU kernels.
//
// Why hand-written: torch's at::vec types pick their instruction set from the
// compile flags of *this* file, and an extension built without -mavx2 gets the
// scalar fallback; a scalar std::exp loop caps the beam step near 2x over eager.
// Each helper has an AVX2+FMA(+F16C) body chosen at run time by a CPU check and a
// portable scalar body (other x86 CPUs, aarch64), so one build runs everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TTS_X86 1
#endif

namespace tts {

struct HalfBits {
  uint16_t bits;
};
struct BF16Bits {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float x) { return x; }
inline float to_float(BF16Bits x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(HalfBits x) {
  // Exponent rebias by multiplication: exact for normals and subnormals.
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t u;
  if (em >= 0x7c00u) {
    u = (em << 13) | 0x7f800000u;  // inf / nan
  } else {
    float f = bits_to_float(em << 13) * 0x1p112f;
    std::memcpy(&u, &f, 4);
  }
  return bits_to_float(u | sign);
}

// exp(x) for x <= 0 (x = logit - running max), relative error ~2e-7.
// Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, then a degree-6 polynomial.
inline float exp_nonpos_scalar(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below any sum that includes exp(0) = 1
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// ---- portable bodies -------------------------------------------------------

// dst[i] = sanitize(src[i] / T) (NaN, +inf -> -inf); returns max(dst[0:n]).
template <typename T>
float load_tile_scalar(const T* src, float* dst, int64_t n, float temperature, bool scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    float v = to_float(src[i]);
    if (scale) v = v / temperature;
    // NaN and +inf are overflow garbage, never a choice.
    v = (v != v || v == std::numeric_limits<float>::infinity()) ? -std::numeric_limits<float>::infinity() : v;
    dst[i] = v;
    mx = v > mx ? v : mx;
  }
  return mx;
}

inline float sum_exp_scalar(const float* x, int64_t n, float m) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += exp_nonpos_scalar(x[i] - m);
  return s;
}

#ifdef TTS_X86
// ---- AVX2 bodies -----------------------------------------------------------
#define TTS_AVX2 __attribute__((target("avx2,fma,f16c")))

TTS_AVX2 inline __m256 exp_nonpos_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

TTS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TTS_AVX2 inline __m256 load8(const BF16Bits* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
TTS_AVX2 inline __m256 load8(const HalfBits* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename T>
TTS_AVX2 float load_tile_avx2(const T* src, float* dst, int64_t n, float temperature, bool scale) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 tv = _mm256_set1_ps(temperature);
  __m256 mx = ninf;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = load8(src + i);
    if (scale) v = _mm256_div_ps(v, tv);  // division, not a reciprocal: same rounding as x / T
    const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(v, pinf, _CMP_EQ_OQ));
    v = _mm256_blendv_ps(v, ninf, bad);  // NaN, +inf -> -inf
    _mm256_storeu_ps(dst + i, v);
    mx = _mm256_max_ps(mx, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = lanes[0];
  for (int k = 1; k < 8; ++k) m = lanes[k] > m ? lanes[k] : m;
  if (i < n) {
    const float tail = load_tile_scalar(src + i, dst + i, n - i, temperature, scale);
    m = tail > m ? tail : m;
  }
  return m;
}

TTS_AVX2 inline float sum_exp_avx2(const float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_ps(s0, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
    s1 = _mm256_add_ps(s1, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv)));
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(s0, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += lanes[k];
  return s + sum_exp_scalar(x + i, n - i, m);
}

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif  // TTS_X86

// ---- dispatch --------------------------------------------------------------

template <typename T>
inline float load_tile(const T* src, float* dst, int64_t n, float temperature, bool scale) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return load_tile_avx2(src, dst, n, temperature, scale);
#endif
  return load_tile_scalar(src, dst, n, temperature, scale);
}

inline float sum_exp_minus(const float* x, int64_t n, float m) {
#ifdef TTS_X86
  if (cpu_has_avx2()) return sum_exp_avx2(x, n, m);
#endif
  return sum_exp_scalar(x, n, m);
}

}  // namespace tts
