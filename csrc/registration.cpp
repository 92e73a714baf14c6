// The op schemas of the `tts` namespace, defined once. Kernels register per
// device in csrc/cpu/*.cpp and csrc/cuda/cuda_ops.cpp; fake (meta) kernels for
// torch.compile live in tts_kernels/ops/_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(tts, m) {
  m.def(
      "beam_topk(Tensor logits, Tensor beam_scores, int num_candidates, float temperature)"
      " -> (Tensor scores, Tensor parents, Tensor tokens)");
  m.def("kv_reorder_(Tensor(a!)[] caches, Tensor parents) -> ()");
  // Sampling (tts_kernels/ops/sample.py): scalar parameters, each overridden per row by its tensor when given.
  // `stats` (float32 [R, 3], optional) receives the rows' confidence statistics with top-`stats_k`
  // (reference.sample_stats_ref), computed in the same pass over the logits.
  m.def(
      "sample(Tensor logits, float temperature, int top_k, float top_p, float min_p, int seed, int offset,"
      " Tensor? temperatures, Tensor? top_ks, Tensor? top_ps, Tensor? min_ps, Tensor? seeds, Tensor? offsets,"
      " Tensor? streams=None, int stats_k=0, Tensor(a!)? stats=None) -> (Tensor tokens, Tensor logprobs)");
  // PagedKVCache bookkeeping (tts_kernels/cache): state = [tables, held, lens, pend, alive, refs,
  // stack, n_free]; each returns an error word and changes nothing when it is non-zero.
  m.def("paged_fork_(Tensor(a!)[] state, Tensor parents, Tensor new_ids) -> int");
  m.def("paged_reorder_(Tensor(a!)[] state, Tensor ids, Tensor parents) -> int");
  m.def("paged_free_(Tensor(a!)[] state, Tensor ids) -> int");
  m.def(
      "paged_begin_step_(Tensor(a!)[] state, Tensor(b!) k_pool, Tensor(c!) v_pool, Tensor ids, Tensor? start,"
      " int t, int max_seq_len) -> (Tensor blk, Tensor slot, int err)");
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens,"
      " float scale, int? sliding_window, Tensor? prefix_lens) -> Tensor");
}
