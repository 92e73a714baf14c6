// The op schemas of the `tts` namespace, defined once. Kernels register per
// device in csrc/cpu/*.cpp and csrc/cuda/cuda_ops.cpp; fake (meta) kernels for
// torch.compile live in tts_kernels/ops/_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(tts, m) {
  m.def(
      "beam_topk(Tensor logits, Tensor beam_scores, int num_candidates, float temperature)"
      " -> (Tensor scores, Tensor parents, Tensor tokens)");
  m.def("kv_reorder_(Tensor(a!)[] caches, Tensor parents) -> ()");
}
