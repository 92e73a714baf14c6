// kv_reorder_ on CUDA: in place, for every tensor, row i <- row parents[i] (as
// it was before the call) for all i with parents[i] != i, over all layers' keys
// and values in one set of launches.
//
// In place is the hard part: a row that is read (the parent of a moved row) and
// also overwritten (moved itself) must be copied aside first. So:
//   0. mark: is_source[p] = 1 for every p = parents[i] with p != i.
//   1. stage: rows with is_source[r] && parents[r] != r go to a scratch buffer.
//   2. write: every moved row i copies from the scratch copy of parents[i] if it
//      was staged, else straight from row parents[i] (an unmoved row, which
//      nobody writes).
// Stream order separates the phases; inside a phase no block reads what another
// writes. In a typical beam step few rows are both read and moved, so staging
// costs little; unmoved rows cost nothing (their blocks exit at once).
//
// Work is described by "pieces" (a byte range of the rows of one tensor) passed
// by value in a fixed-size kernel-parameter struct: no host-built pointer array
// goes through device memory, and more pieces than fit take more launches. The
// scratch buffer holds one piece-row per row and piece, at most the workspace
// given; caches larger than that are done in several passes over byte ranges
// (different byte ranges of a row never interact, so passes are independent).
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tts {
namespace cuda {
namespace {

constexpr int kCopyThreads = 256;
// Pieces per launch: 48 x 48 bytes keeps the parameter struct well inside the
// 4 KB kernel-parameter limit of every CUDA version.
constexpr int kMaxPieces = 48;
constexpr size_t kAlign = 256;
// Each thread copies at least this many units per launch before more blocks are
// added: fewer, fatter blocks for long rows.
constexpr int64_t kUnitsPerThread = 4;
constexpr int kMaxBlocksX = 1024;
constexpr int kMaxRowsZ = 65535;  // grid z limit; more rows are strided over

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct Piece {
  char* base;          // tensor data
  int64_t row_stride;  // bytes between rows
  int64_t offset;      // first byte of the piece within a row
  int64_t len;         // bytes of the piece
  int64_t scratch;     // byte offset of the piece's staging area; row r at scratch + r * len
  int vec;             // widest access (16/8/4/2/1 bytes) dividing all of the above
};

struct PieceBatch {
  Piece p[kMaxPieces];
  int count;
};
static_assert(sizeof(PieceBatch) + 64 <= 4096, "kernel parameters must stay under 4 KB");

__global__ void mark_sources_kernel(const int64_t* __restrict__ parents, int64_t n,
                                    int* __restrict__ is_source) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = parents[i];
    if (p != i) is_source[p] = 1;  // racing writes all store 1
  }
}

template <typename U>
__device__ __forceinline__ void copy_units(char* dst, const char* src, int64_t bytes) {
  U* d = reinterpret_cast<U*>(dst);
  const U* s = reinterpret_cast<const U*>(src);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(U));
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < n;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x)
    d[u] = s[u];
}

__device__ __forceinline__ void copy_piece(char* dst, const char* src, int64_t len, int vec) {
  switch (vec) {  // uniform per block
    case 16: copy_units<uint4>(dst, src, len); break;
    case 8: copy_units<uint2>(dst, src, len); break;
    case 4: copy_units<unsigned>(dst, src, len); break;
    case 2: copy_units<unsigned short>(dst, src, len); break;
    default: copy_units<unsigned char>(dst, src, len); break;
  }
}

__device__ __forceinline__ bool is_staged(const int64_t* parents, const int* is_source, int64_t r) {
  return is_source[r] && parents[r] != r;
}

// grid: x = blocks along a piece-row, y = piece, z = rows (strided).
__global__ void __launch_bounds__(kCopyThreads)
    stage_kernel(PieceBatch batch, const int64_t* __restrict__ parents,
                 const int* __restrict__ is_source, int64_t n, char* __restrict__ scratch) {
  const Piece& pc = batch.p[blockIdx.y];
  for (int64_t r = blockIdx.z; r < n; r += gridDim.z) {
    if (!is_staged(parents, is_source, r)) continue;
    copy_piece(scratch + pc.scratch + r * pc.len, pc.base + r * pc.row_stride + pc.offset, pc.len,
               pc.vec);
  }
}

__global__ void __launch_bounds__(kCopyThreads)
    write_kernel(PieceBatch batch, const int64_t* __restrict__ parents,
                 const int* __restrict__ is_source, int64_t n, const char* __restrict__ scratch) {
  const Piece& pc = batch.p[blockIdx.y];
  for (int64_t r = blockIdx.z; r < n; r += gridDim.z) {
    const int64_t src = parents[r];
    if (src == r) continue;
    const char* from = is_staged(parents, is_source, src)
                           ? scratch + pc.scratch + src * pc.len
                           : pc.base + src * pc.row_stride + pc.offset;
    copy_piece(pc.base + r * pc.row_stride + pc.offset, from, pc.len, pc.vec);
  }
}

int widest_access(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e) {
  const uint64_t bits = a | b | c | d | e;  // all multiples of v <=> their OR is
  for (int v = 16; v > 1; v >>= 1)
    if (bits % v == 0) return v;
  return 1;
}

size_t flags_bytes(int64_t n) { return align_up(static_cast<size_t>(n) * sizeof(int), kAlign); }

// Launches phase 1 then phase 2 for one pass (its pieces fit the scratch together).
cudaError_t run_pass(const std::vector<Piece>& pieces, const int64_t* parents, const int* is_source,
                     int64_t n, char* scratch, cudaStream_t stream) {
  const unsigned rows_z = static_cast<unsigned>(std::min<int64_t>(n, kMaxRowsZ));
  for (int phase = 1; phase <= 2; ++phase) {
    for (size_t first = 0; first < pieces.size(); first += kMaxPieces) {
      PieceBatch batch{};
      batch.count = static_cast<int>(std::min<size_t>(kMaxPieces, pieces.size() - first));
      int64_t most_units = 1;
      for (int i = 0; i < batch.count; ++i) {
        batch.p[i] = pieces[first + i];
        most_units = std::max<int64_t>(most_units, batch.p[i].len / batch.p[i].vec);
      }
      const int64_t per_block = kCopyThreads * kUnitsPerThread;
      const unsigned bx = static_cast<unsigned>(
          std::min<int64_t>(kMaxBlocksX, (most_units + per_block - 1) / per_block));
      const dim3 grid(bx, static_cast<unsigned>(batch.count), rows_z);
      if (phase == 1)
        stage_kernel<<<grid, kCopyThreads, 0, stream>>>(batch, parents, is_source, n, scratch);
      else
        write_kernel<<<grid, kCopyThreads, 0, stream>>>(batch, parents, is_source, n, scratch);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace

size_t kv_reorder_workspace_bytes(int64_t num_rows, const KvTensor* tensors, int num_tensors,
                                  size_t scratch_budget) {
  if (num_rows <= 0 || num_tensors <= 0) return 0;
  size_t per_row = 0;  // scratch bytes per row that would do everything in one pass
  for (int t = 0; t < num_tensors; ++t)
    per_row += align_up(static_cast<size_t>(std::max<int64_t>(0, tensors[t].row_bytes)), 16);
  const size_t least = static_cast<size_t>(num_rows) * 16;
  const size_t all = static_cast<size_t>(num_rows) * per_row;
  const size_t scratch = std::max(least, std::min(all, scratch_budget));
  return flags_bytes(num_rows) + scratch;
}

cudaError_t launch_kv_reorder(const KvTensor* tensors, int num_tensors, const int64_t* parents,
                              int64_t num_rows, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  const int64_t n = num_rows;
  if (n <= 0 || num_tensors <= 0) return cudaSuccess;
  const size_t fbytes = flags_bytes(n);
  if (workspace == nullptr || workspace_bytes < fbytes + static_cast<size_t>(n) * 16)
    return cudaErrorInvalidValue;
  int* is_source = static_cast<int*>(workspace);
  char* scratch = static_cast<char*>(workspace) + fbytes;
  // Bytes of piece-rows per pass, per row (a multiple of 16 keeps cuts aligned).
  const int64_t per_row_cap = static_cast<int64_t>((workspace_bytes - fbytes) / n) / 16 * 16;

  cudaError_t err = cudaMemsetAsync(is_source, 0, static_cast<size_t>(n) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  const int mark_blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
  mark_sources_kernel<<<mark_blocks, 256, 0, stream>>>(parents, n, is_source);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  std::vector<Piece> pass;
  int64_t used = 0;  // bytes per row taken in this pass (multiple of 16)
  for (int t = 0; t < num_tensors; ++t) {
    const KvTensor& kt = tensors[t];
    for (int64_t off = 0; off < kt.row_bytes;) {
      if (used >= per_row_cap) {
        if ((err = run_pass(pass, parents, is_source, n, scratch, stream)) != cudaSuccess) return err;
        pass.clear();
        used = 0;
      }
      const int64_t len = std::min(kt.row_bytes - off, per_row_cap - used);
      const int64_t at = used * n;  // this piece's staging area: n rows of len bytes
      Piece pc{static_cast<char*>(kt.base), kt.row_stride_bytes, off, len, at, 1};
      pc.vec = widest_access(reinterpret_cast<uintptr_t>(kt.base), static_cast<uint64_t>(kt.row_stride_bytes),
                             static_cast<uint64_t>(off), static_cast<uint64_t>(len),
                             reinterpret_cast<uintptr_t>(scratch) + static_cast<uint64_t>(at));
      pass.push_back(pc);
      used += static_cast<int64_t>(align_up(static_cast<size_t>(len), 16));
      off += len;
    }
  }
  if (!pass.empty()) err = run_pass(pass, parents, is_source, n, scratch, stream);
  return err;
}

}  // namespace cuda
}  // namespace tts
