// beam_topk on CPU: one read of the logits.
//
// For every (row, vocabulary chunk) task we keep an online softmax pair
// (running max m, running sum d = sum exp(x - m)) and a small sorted top-C list
// of raw (temperature-scaled) logits. log-softmax and the beam score are applied
// to the survivors only: a per-row constant cannot change the order within a
// row. Partial records of the chunks of one row are merged, then the K rows of a
// batch item are merged into its top C.
//
//   score(b, j, v) = ((x[b*K+j, v] / T - m) - log(d)) + beam_scores[b, j]
//
// Ties are broken by the lower flat index j*V + v (chunks and rows are merged in
// index order, and an element only displaces strictly smaller values).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

namespace tts {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Elements converted and reduced at a time: 2 KiB of floats stays in L1 while
// the chunk is read a second time (max first, then exp-sum), so the logits
// themselves are read from memory once.
constexpr int64_t kTile = 512;
// Below this many elements per task, splitting a row over threads costs more
// than it saves.
constexpr int64_t kMinSplit = 16384;

struct Cand {
  float value;    // scaled logit while scanning; full score after the merge
  int64_t index;  // token index (row scan) or flat parent*V + token (merge)
};

// Sorted (descending value, ascending index) list of at most `cap` candidates.
struct TopList {
  Cand* items;
  int64_t size = 0;
  int64_t cap;

  float threshold() const { return size < cap ? kNegInf : items[size - 1].value; }
  bool full() const { return size == cap; }

  // Insert keeping order; equal values keep the earlier (lower index) one first.
  void push(float v, int64_t idx) {
    int64_t pos = size < cap ? size : cap - 1;
    if (size == cap && !(v > items[cap - 1].value)) return;
    while (pos > 0 && v > items[pos - 1].value) {
      items[pos] = items[pos - 1];
      --pos;
    }
    items[pos] = Cand{v, idx};
    if (size < cap) ++size;
  }
};

// Scan logits[begin:end) of one row: updates (m, d) and the top list.
template <typename T>
void scan_range(const T* row, int64_t begin, int64_t end, float temperature, float* m_out, float* d_out,
                TopList& top) {
  alignas(64) float buf[kTile];
  const bool scale = temperature != 1.0f;
  float m = kNegInf, d = 0.0f;
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const float cmax = load_tile(row + t0, buf, n, temperature, scale);
    if (cmax > m) {
      // Rescale the running sum to the new max (exp(-inf) = 0 when m was -inf).
      d = (m == kNegInf) ? 0.0f : d * std::exp(m - cmax);
      m = cmax;
    }
    if (m != kNegInf) d += sum_exp_minus(buf, n, m);
    // Most tiles hold nothing that beats the C-th best so far: one compare.
    if (!top.full() || cmax > top.threshold()) {
      for (int64_t i = 0; i < n; ++i) {
        if (!top.full() || buf[i] > top.threshold()) top.push(buf[i], t0 + i);
      }
    }
  }
  *m_out = m;
  *d_out = d;
}

template <typename T>
void beam_topk_kernel(const T* logits, int64_t row_stride, const float* beam_scores, int64_t B, int64_t K,
                      int64_t V, int64_t C, float temperature, float* out_scores, int64_t* out_parents,
                      int64_t* out_tokens) {
  const int64_t R = B * K;
  const int64_t Crow = std::min(C, V);  // a row can contribute at most V candidates
  const int64_t threads = at::get_num_threads();
  // Split rows over vocabulary chunks only when rows alone cannot fill the threads.
  int64_t splits = 1;
  if (R < 2 * threads) {
    splits = std::max<int64_t>(1, std::min<int64_t>((2 * threads + R - 1) / R, V / kMinSplit));
  }
  const int64_t chunk = (V + splits - 1) / splits;
  const int64_t tasks = R * splits;
  std::vector<Cand> part_items(tasks * Crow);
  std::vector<int64_t> part_size(tasks);
  std::vector<float> part_m(tasks), part_d(tasks);

  at::parallel_for(0, tasks, tts::grain_for(chunk), [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r = t / splits, s = t % splits;
      const int64_t begin = s * chunk, end = std::min(V, begin + chunk);
      TopList top{part_items.data() + t * Crow, 0, Crow};
      scan_range(logits + r * row_stride, begin, std::max(begin, end), temperature, &part_m[t], &part_d[t], top);
      part_size[t] = top.size;
    }
  });

  at::parallel_for(0, B, tts::grain_for(K * splits * Crow), [&](int64_t b_begin, int64_t b_end) {
    std::vector<Cand> row_buf(Crow), merged(C);
    for (int64_t b = b_begin; b < b_end; ++b) {
      TopList best{merged.data(), 0, C};
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = b * K + j;
        // Merge the splits of this row: global max, rescaled sums, top Crow.
        float m = kNegInf;
        for (int64_t s = 0; s < splits; ++s) m = std::max(m, part_m[r * splits + s]);
        float d = 0.0f;
        TopList row_top{row_buf.data(), 0, Crow};
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t t = r * splits + s;
          if (part_m[t] != kNegInf) d += part_d[t] * std::exp(part_m[t] - m);
          for (int64_t i = 0; i < part_size[t]; ++i) {
            const Cand& c = part_items[t * Crow + i];
            if (!row_top.full() || c.value > row_top.threshold()) row_top.push(c.value, c.index);
            else break;  // each split's list is sorted
          }
        }
        const float log_d = std::log(d);
        const float bs = beam_scores[b * K + j];
        // A row without a finite max (all -inf: +inf and NaN were made -inf) has
        // no defined log-softmax, and a -inf beam score (a finished beam) kills the row too:
        // all its scores are -inf (never NaN), so its candidates, all tied, are
        // its lowest token indices.
        if (!std::isfinite(m) || bs == kNegInf) {
          for (int64_t v = 0; v < Crow && !best.full(); ++v) best.push(kNegInf, j * V + v);
          continue;
        }
        for (int64_t i = 0; i < row_top.size; ++i) {
          const Cand& c = row_top.items[i];
          const float score = ((c.value - m) - log_d) + bs;
          if (!best.full() || score > best.threshold()) best.push(score, j * V + c.index);
          else break;  // scores within a row are sorted too
        }
      }
      for (int64_t i = 0; i < C; ++i) {
        // best.size == C because K * min(C, V) >= C whenever C <= K * V.
        out_scores[b * C + i] = merged[i].value;
        out_parents[b * C + i] = merged[i].index / V;
        out_tokens[b * C + i] = merged[i].index % V;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cpu(const at::Tensor& logits_in,
                                                               const at::Tensor& beam_scores_in,
                                                               int64_t num_candidates, double temperature) {
  TORCH_CHECK(logits_in.dim() == 2, "beam_topk: logits must be 2-D [B*K, V]");
  TORCH_CHECK(beam_scores_in.dim() == 2 && beam_scores_in.scalar_type() == at::kFloat,
              "beam_topk: beam_scores must be a float32 [B, K] tensor");
  const int64_t B = beam_scores_in.size(0), K = beam_scores_in.size(1), V = logits_in.size(1);
  TORCH_CHECK(logits_in.size(0) == B * K, "beam_topk: logits rows must equal B*K");
  TORCH_CHECK(num_candidates >= 1 && num_candidates <= K * V, "beam_topk: num_candidates must be in [1, K*V]");
  TORCH_CHECK(temperature > 0.0, "beam_topk: temperature must be > 0");
  // Rows may be strided (e.g. logits[:, -1, :] of [N, T, V]); tokens must be contiguous.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor beam_scores = beam_scores_in.contiguous();
  const int64_t C = num_candidates;
  auto scores = at::empty({B, C}, beam_scores.options());
  auto parents = at::empty({B, C}, beam_scores.options().dtype(at::kLong));
  auto tokens = at::empty({B, C}, beam_scores.options().dtype(at::kLong));
  const float T = static_cast<float>(temperature);
  const int64_t rs = logits.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      beam_topk_kernel(logits.data_ptr<float>(), rs, beam_scores.data_ptr<float>(), B, K, V, C, T,
                       scores.data_ptr<float>(), parents.data_ptr<int64_t>(), tokens.data_ptr<int64_t>());
      break;
    case at::kHalf:
      beam_topk_kernel(reinterpret_cast<const HalfBits*>(logits.data_ptr<at::Half>()), rs,
                       beam_scores.data_ptr<float>(), B, K, V, C, T, scores.data_ptr<float>(),
                       parents.data_ptr<int64_t>(), tokens.data_ptr<int64_t>());
      break;
    case at::kBFloat16:
      beam_topk_kernel(reinterpret_cast<const BF16Bits*>(logits.data_ptr<at::BFloat16>()), rs,
                       beam_scores.data_ptr<float>(), B, K, V, C, T, scores.data_ptr<float>(),
                       parents.data_ptr<int64_t>(), tokens.data_ptr<int64_t>());
      break;
    default:
      TORCH_CHECK(false, "beam_topk: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  return {scores, parents, tokens};
}

}  // namespace

TORCH_LIBRARY_IMPL(tts, CPU, m) { m.impl("beam_topk", &beam_topk_cpu); }

}  // namespace tts
