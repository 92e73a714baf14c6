#!/usr/bin/env bash
# The one prepared script for a GPU machine (H200, torch with CUDA, nvcc, no internet).
# Builds the CUDA extension, runs the CUDA tests (tests/test_cuda_*.py), runs
# `tts-kernels bench`, and writes everything under $OUT. Budget: < 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"; date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (TORCH_CUDA_ARCH_LIST=9.0a)"
t0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
timeout 300 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/build.log"
[ $rc -eq 0 ] || { grep -E "error" "$OUT/build.log" | head -40; exit $rc; }
python -c "import tts_kernels, tts_kernels._ext as e; print('HAS_C', e.HAS_C, 'CUDA kernels', e.HAS_CUDA_KERNELS)"

echo "== CUDA tests (beam_topk, PagedKVCache, paged_attention, sample: every test_cuda_*.py)"
timeout 180 python -m pytest -q tests/test_cuda_*.py 2>&1 | tail -15
# The CPU tests are CI's job; this device time goes to what only a GPU can show.
echo "== bench (every op against its peer: beam_topk, kv_reorder_, paged_attention, kv_fork (beam step, roll-back), sample, resample, beam_search)"
timeout 300 tts-kernels bench --out "$OUT/bench" 2>&1 | tail -60
echo "== best-of-N end to end on CUDA"
timeout 90 python benchmarks/bench_best_of_n.py --rounds 2 --device cuda --json "$OUT/best_of_n.json" 2>&1 | tail -5
echo "== step-level searches on CUDA (quick)"
timeout 90 python benchmarks/bench_step_search.py --quick --device cuda --json "$OUT/step_search.json" 2>&1 | tail -8
echo "== likelihood verifier (HFPRM head=likelihood) on CUDA"
timeout 60 python benchmarks/bench_likelihood.py --rounds 2 --device cuda --json "$OUT/likelihood.json" 2>&1 | tail -5
echo "== done $(date -u)"
