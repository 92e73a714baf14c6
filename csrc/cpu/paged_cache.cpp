// PagedKVCache bookkeeping on CPU: fork, reorder, free and the first append of a step.
//
// The meaning and the state layout are those of tts_kernels/cache/_paged_ops.py
// (the portable tensor-op implementation); these kernels make the same
// decisions in the same order (same blocks taken from the free stack, freed
// blocks pushed in increasing id order), so the two backends give identical
// state, which the tests check. Each op checks everything first and returns an
// error word (bits as in _paged_ops.py; for reorder, the parent_ids bits are
// shifted left by 8) without touching anything when it is non-zero.
//
// ``state`` is the list [tables, held, lens, pend, alive, refs, stack, n_free]:
// tables [S+1, MB], held/lens/pend [S+1], refs/stack [NB+1] int64, alive [S+1]
// bool, n_free 0-dim int64; row S, block NB and stack slot NB are trash entries.
// The bookkeeping is serial (it touches a few integers per sequence); the block
// copies of copy-on-write run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cpu/parallel.h"

namespace tts {
namespace {

constexpr int64_t BAD_ID = 1, NOT_ALIVE = 2, DUPLICATE = 4, EXHAUSTED = 8, TOO_LONG = 16, BAD_START = 32;

struct State {
  int64_t *tables, *held, *lens, *pend, *refs, *stack, *n_free;
  bool* alive;
  int64_t S, NB, MB;
  int64_t* row(int64_t s) const { return tables + s * MB; }
};

State unpack(at::TensorList st, const char* op) {
  TORCH_CHECK(st.size() == 8, op, ": state must list 8 tensors");
  for (size_t i = 0; i < st.size(); ++i) {
    TORCH_CHECK(st[i].device().is_cpu() && st[i].is_contiguous(), op, ": state[", i, "] must be contiguous on CPU");
    TORCH_CHECK(st[i].scalar_type() == (i == 4 ? at::kBool : at::kLong), op, ": state[", i, "] has the wrong dtype");
  }
  State s;
  s.tables = st[0].data_ptr<int64_t>();
  s.held = st[1].data_ptr<int64_t>();
  s.lens = st[2].data_ptr<int64_t>();
  s.pend = st[3].data_ptr<int64_t>();
  s.alive = st[4].data_ptr<bool>();
  s.refs = st[5].data_ptr<int64_t>();
  s.stack = st[6].data_ptr<int64_t>();
  s.n_free = st[7].data_ptr<int64_t>();
  s.S = st[4].size(0) - 1;
  s.NB = st[5].size(0) - 1;
  s.MB = st[0].size(1);
  return s;
}

at::Tensor ids_of(const at::Tensor& ids, const char* op) {
  TORCH_CHECK(ids.dim() == 1 && ids.device().is_cpu(), op, ": ids must be 1-D CPU tensors");
  return ids.to(at::kLong).contiguous();
}

int64_t check_ids(const State& s, const int64_t* ids, int64_t n, bool distinct) {
  int64_t err = 0;
  std::vector<char> seen(distinct ? s.S : 0, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= s.S) {
      err |= BAD_ID;
      continue;
    }
    if (!s.alive[id]) err |= NOT_ALIVE;
    if (distinct) {
      if (seen[id]) err |= DUPLICATE;
      seen[id] = 1;
    }
  }
  return err;
}

// refs += delta; blocks that reach zero go on the free stack in increasing id order.
void apply_delta(State& s, const std::unordered_map<int64_t, int64_t>& delta) {
  std::vector<int64_t> freed;
  for (const auto& [b, d] : delta) {
    if (d == 0) continue;
    s.refs[b] += d;
    if (s.refs[b] == 0) freed.push_back(b);
  }
  std::sort(freed.begin(), freed.end());
  for (int64_t b : freed) s.stack[(*s.n_free)++] = b;
}

void clean_trash(State& s) {
  std::fill(s.row(s.S), s.row(s.S) + s.MB, -1);
  s.held[s.S] = s.lens[s.S] = s.pend[s.S] = 0;
  s.alive[s.S] = false;
  s.refs[s.NB] = 0;
}

int64_t paged_fork_cpu(at::TensorList state, const at::Tensor& parents_in, const at::Tensor& new_in) {
  State s = unpack(state, "paged_fork_");
  const at::Tensor parents = ids_of(parents_in, "paged_fork_"), new_ids = ids_of(new_in, "paged_fork_");
  const int64_t n = parents.size(0);
  const int64_t *p = parents.data_ptr<int64_t>(), *c = new_ids.data_ptr<int64_t>();
  if (const int64_t err = check_ids(s, p, n, false)) return err;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(c[i] >= 0 && c[i] < s.S && !s.alive[c[i]], "paged_fork_: new id ", c[i], " is not a free slot");
  }
  // Parents are live and new ids are not, so no row is both read and written.
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(s.row(c[i]), s.row(p[i]), s.MB * sizeof(int64_t));
    for (int64_t j = 0; j < s.held[p[i]]; ++j) s.refs[s.row(p[i])[j]] += 1;
    s.held[c[i]] = s.held[p[i]];
    s.lens[c[i]] = s.pend[c[i]] = s.lens[p[i]];
    s.alive[c[i]] = true;
  }
  return 0;
}

int64_t paged_reorder_cpu(at::TensorList state, const at::Tensor& ids_in, const at::Tensor& parents_in) {
  State s = unpack(state, "paged_reorder_");
  const at::Tensor ids = ids_of(ids_in, "paged_reorder_"), parents = ids_of(parents_in, "paged_reorder_");
  const int64_t n = ids.size(0);
  TORCH_CHECK(parents.size(0) == n, "paged_reorder_: ids and parents must have the same length");
  const int64_t *d = ids.data_ptr<int64_t>(), *p = parents.data_ptr<int64_t>();
  const int64_t err = check_ids(s, d, n, true) | (check_ids(s, p, n, false) << 8);
  if (err) return err;
  // Snapshot the parents' rows first: a parent may itself be overwritten.
  std::vector<int64_t> rows(n * s.MB), held(n), lens(n);
  std::unordered_map<int64_t, int64_t> delta;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(&rows[i * s.MB], s.row(p[i]), s.MB * sizeof(int64_t));
    held[i] = s.held[p[i]];
    lens[i] = s.lens[p[i]];
    for (int64_t j = 0; j < held[i]; ++j) delta[rows[i * s.MB + j]] += 1;
    for (int64_t j = 0; j < s.held[d[i]]; ++j) delta[s.row(d[i])[j]] -= 1;
  }
  apply_delta(s, delta);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(s.row(d[i]), &rows[i * s.MB], s.MB * sizeof(int64_t));
    s.held[d[i]] = held[i];
    s.lens[d[i]] = s.pend[d[i]] = lens[i];
  }
  return 0;
}

int64_t paged_free_cpu(at::TensorList state, const at::Tensor& ids_in) {
  State s = unpack(state, "paged_free_");
  const at::Tensor ids = ids_of(ids_in, "paged_free_");
  const int64_t n = ids.size(0);
  const int64_t* d = ids.data_ptr<int64_t>();
  if (const int64_t err = check_ids(s, d, n, true)) return err;
  std::unordered_map<int64_t, int64_t> delta;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < s.held[d[i]]; ++j) delta[s.row(d[i])[j]] -= 1;
  apply_delta(s, delta);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(s.row(d[i]), s.row(d[i]) + s.MB, -1);
    s.held[d[i]] = s.lens[d[i]] = s.pend[d[i]] = 0;
    s.alive[d[i]] = false;
  }
  return 0;
}

// First append of a step: take blocks (new ones, and private copies of shared
// blocks about to be written), copy those blocks' contents on every layer, set
// the pending lengths, and return where each new token goes: blk, slot [n, t]
// (the trash block NB for tokens before start).
std::tuple<at::Tensor, at::Tensor, int64_t> paged_begin_step_cpu(
    at::TensorList state, at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& ids_in,
    const std::optional<at::Tensor>& start_in, int64_t t, int64_t max_seq_len) {
  State s = unpack(state, "paged_begin_step_");
  const at::Tensor ids = ids_of(ids_in, "paged_begin_step_");
  const int64_t n = ids.size(0);
  const int64_t* d = ids.data_ptr<int64_t>();
  TORCH_CHECK(k_pool.dim() == 5 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.size(1) == s.NB + 1,
              "paged_begin_step_: pools must be contiguous [L, NB+1, H, P, D]");
  const int64_t P = k_pool.size(3);
  int64_t err = check_ids(s, d, n, true);
  std::vector<int64_t> start(n, 0);
  if (start_in.has_value()) {
    const at::Tensor st = ids_of(*start_in, "paged_begin_step_");
    TORCH_CHECK(st.size(0) == n, "paged_begin_step_: start must have one entry per sequence");
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = st.data_ptr<int64_t>()[i];
      if (v < 0 || v > t) err |= BAD_START;
      start[i] = std::min(std::max(v, int64_t{0}), t);
    }
  }
  if (err & (BAD_ID | NOT_ALIVE)) return {at::Tensor(), at::Tensor(), err};  // rows below would be unsafe

  const int64_t J = (t + P - 1) / P + 1;
  std::vector<int64_t> L0(n), L1(n), need(n), b_old(n * J, s.NB);
  std::vector<char> take(n * J, 0), copy(n * J, 0);
  std::unordered_map<int64_t, std::pair<int64_t, int64_t>> holders;  // block -> (count, last flat index)
  for (int64_t i = 0; i < n; ++i) {
    L0[i] = s.lens[d[i]];
    L1[i] = L0[i] + (t - start[i]);
    if (L1[i] > max_seq_len) err |= TOO_LONG;
    need[i] = (L1[i] + P - 1) / P;
    for (int64_t jj = 0; jj < J; ++jj) {
      const int64_t j = L0[i] / P + jj, f = i * J + jj;
      const bool touched = t - start[i] > 0 && j < need[i];
      const bool existing = touched && j < s.held[d[i]];
      if (existing) b_old[f] = s.row(d[i])[std::min(j, s.MB - 1)];
      take[f] = touched && !existing;  // fresh block
      if (existing && s.refs[b_old[f]] > 1) {
        auto& h = holders[b_old[f]];
        h.first += 1;
        h.second = f;
        copy[f] = 1;  // shared: copied unless it is the last holder of a block all of whose holders are here
      }
    }
  }
  int64_t k = 0;
  for (int64_t f = 0; f < n * J; ++f) {
    if (copy[f]) {
      const auto& h = holders[b_old[f]];
      if (s.refs[b_old[f]] == h.first && h.second == f) copy[f] = 0;
    }
    take[f] |= copy[f];
    k += take[f];
  }
  if (k > *s.n_free) err |= EXHAUSTED;
  if (err) return {at::Tensor(), at::Tensor(), err};

  // Commit.
  std::vector<int64_t> newb(n * J, s.NB), src, dst;
  int64_t rank = 0;
  for (int64_t f = 0; f < n * J; ++f) {
    if (!take[f]) continue;
    newb[f] = s.stack[*s.n_free - 1 - rank++];
    s.refs[newb[f]] = 1;
    if (copy[f]) {
      s.refs[b_old[f]] -= 1;
      src.push_back(b_old[f]);
      dst.push_back(newb[f]);
    }
    const int64_t i = f / J, j = L0[i] / P + f % J;
    s.row(d[i])[std::min(j, s.MB - 1)] = newb[f];
  }
  *s.n_free -= k;
  std::memcpy(s.pend, s.lens, (s.S + 1) * sizeof(int64_t));
  for (int64_t i = 0; i < n; ++i) {
    s.held[d[i]] = std::max(s.held[d[i]], need[i]);
    s.pend[d[i]] = L1[i];
  }
  clean_trash(s);

  // Copy-on-write: block contents on every layer, K and V.
  const int64_t L = k_pool.size(0), nc = static_cast<int64_t>(src.size());
  const int64_t block_bytes = k_pool.stride(1) * k_pool.element_size();
  const int64_t layer_bytes = k_pool.stride(0) * k_pool.element_size();
  char* pools[2] = {static_cast<char*>(k_pool.data_ptr()), static_cast<char*>(v_pool.data_ptr())};
  at::parallel_for(0, nc * L * 2, tts::grain_for(block_bytes / 4), [&](int64_t b, int64_t e) {
    for (int64_t x = b; x < e; ++x) {
      const int64_t c = x / (2 * L), l = (x / 2) % L;
      char* base = pools[x % 2] + l * layer_bytes;
      std::memcpy(base + dst[c] * block_bytes, base + src[c] * block_bytes, block_bytes);
    }
  });

  at::Tensor blk = at::empty({n, t}, at::kLong), slot = at::empty({n, t}, at::kLong);
  int64_t *bp = blk.data_ptr<int64_t>(), *sp = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t x = 0; x < t; ++x) {
      const int64_t pos = std::max(L0[i] + x - start[i], int64_t{0});
      const int64_t jj = std::min(std::max(pos / P - L0[i] / P, int64_t{0}), J - 1);
      const int64_t f = i * J + jj;
      bp[i * t + x] = x >= start[i] ? (take[f] ? newb[f] : b_old[f]) : s.NB;
      sp[i * t + x] = pos % P;
    }
  }
  return {blk, slot, 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(tts, CPU, m) {
  m.impl("paged_fork_", &paged_fork_cpu);
  m.impl("paged_reorder_", &paged_reorder_cpu);
  m.impl("paged_free_", &paged_free_cpu);
  m.impl("paged_begin_step_", &paged_begin_step_cpu);
}

}  // namespace tts
