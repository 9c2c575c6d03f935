// Multi-adapter LoRA kernels: host launchers over raw pointers (no ATen), so that this header and
// multi_lora_kernels.cu compile with plain CUDA headers; the torch-facing glue is multi_lora_cuda.cpp.
//
//   y[i] = s[l] * (x[i] @ A[l, :r].T) @ B[l, :, :r].T,  l = idx[i], r = ranks[l];  0 where l is not in [0, L)
//       x [M, K], A [L, R, K], B [L, N, R], idx [M] (int32/int64), s [L] fp32, ranks [L] (int32/int64, or none = R)
//
// Every kernel treats an index outside [0, L) as "no adapter" and clamps ranks to [0, R]: no value in
// idx or ranks can make a kernel touch memory outside its tensors (the Python layer raises on bad
// values before launching; this keeps graphs replayed with unchecked indices memory-safe too).
//
// Two regimes:
//   decode  (BGMV): every row on its own, adapters re-read per row (from L2 when rows share one).
//   segment (SGMV): rows sorted by adapter (`perm`), cut into tiles of kTileRows rows of one adapter;
//                   each tile reads its adapter once and runs a small GEMM on tensor cores (16-bit).
// Backward runs in the segment regime; dA and dB are reduced per adapter in a fixed row order
// (deterministic, no atomics).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lora_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of one adapter per segment tile; also the M tile of every segment-regime GEMM.
constexpr int kTileRows = 64;
// Largest r_max the CUDA kernels take (shared-memory row of S in the decode expand).
constexpr int kMaxRank = 256;

// A per-row adapter index or a per-adapter rank vector, int32 or int64. ptr == nullptr for ranks
// means "every adapter has rank R".
struct IntVec {
  const void* ptr = nullptr;
  bool is64 = false;
};

// ---------------------------------------------------------------------------------------------
// decode regime
// ---------------------------------------------------------------------------------------------
// part[s, i, j] = sum_{k in split s} x[i, k] * A[l, j, k]  (j < r; 0 for j in [r, R) and rows without adapter)
//     x [M, K] (row stride stride_xm, unit column stride), A [L, R, K] contiguous, part [split, M, R] fp32
struct BgmvShrinkArgs {
  const void* x;
  int64_t stride_xm;
  const void* A;
  IntVec idx, ranks;
  float* part;
  int64_t M, K;
  int R, L;
  int split;
  int k_chunk;  // columns of x per split, a multiple of 256
};
// How to cut K so that M * split blocks fill the GPU; returns split and sets *k_chunk.
int bgmv_shrink_split(int64_t M, int64_t K, int sm_count, int* k_chunk);
cudaError_t bgmv_shrink(DType dtype, const BgmvShrinkArgs& a, cudaStream_t stream);

// y[i, n] = s[l] * sum_{j < r} S[i, j] * B[l, n, j],  S[i] = sum_s part[s, i]   (0 for rows without adapter)
//     B [L, N, R] contiguous, y [M, N] contiguous; s_out [M, R] (optional) receives S.
struct BgmvExpandArgs {
  const float* part;
  int split;
  const void* B;
  IntVec idx, ranks;
  const float* scales;
  void* y;
  float* s_out;  // nullptr: not written
  int64_t M, N;
  int R, L;
};
cudaError_t bgmv_expand(DType dtype, const BgmvExpandArgs& a, int sm_count, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// segment regime
// ---------------------------------------------------------------------------------------------
// keys[i] = idx[i] if 0 <= idx[i] < L else L (the "no adapter" group, sorted last).
cudaError_t make_keys(IntVec idx, int64_t M, int L, int32_t* keys, cudaStream_t stream);

// From keys sorted ascending (stable): seg_start[g] = first sorted position of group g (g = 0..L, the
// last being "no adapter"), seg_start[L + 1] = M; tile_start[g] = first tile of group g with
// kTileRows rows per tile, tile_start[L + 1] = number of tiles. Both [L + 2] int32. One block.
cudaError_t build_segments(const int32_t* sorted_keys, int64_t M, int L, int32_t* seg_start, int32_t* tile_start,
                    cudaStream_t stream);
// Upper bound on the number of tiles (the static grid size: CUDA-graph safe).
int64_t max_tiles(int64_t M, int L);

// make_keys + a stable sort + build_segments in one launch for M <= kSortMaxRows: a counting sort up
// to 255 adapters (one block up to 1024 rows, else a thread-block cluster of up to 8 on sm_90+),
// else a one-block radix sort of the keys with their row numbers; either way the result is the
// stable sort's (equal keys keep their row order). perm [M] int64, seg_start / tile_start [L + 2] as above.
constexpr int64_t kSortMaxRows = 8192;
cudaError_t sort_segments(IntVec idx, int64_t M, int L, int64_t* perm, int32_t* seg_start, int32_t* tile_start,
                          cudaStream_t stream);
// Tiles past their group's first: sum over groups of floor((rows - 1) / kTileRows) <= M / kTileRows.
constexpr int64_t max_overflow_tiles(int64_t M) { return M / kTileRows; }

struct Segments {
  const int64_t* perm;        // [M] original row of each sorted position (the indices of a stable sort)
  const int32_t* seg_start;   // [L + 2]
  const int32_t* tile_start;  // [L + 2]
  int64_t n_tiles_max;
};

// out_part[s, i, c] = sum_{d in split s} P[i, d] * W_l(d, c)   (c < r_l; 0 past the rank and for "no adapter")
//   W_l(d, c) = W[l * D * R + d * stride_d + c * stride_c]  with either stride_d = 1 (forward: W = A
//   [L, R, K], stride_c = K) or stride_c = 1 (backward dy @ B: W = B [L, N, R], stride_d = R).
struct SgmvShrinkArgs {
  const void* P;
  int64_t stride_pm;
  const void* W;
  bool w_d_contiguous;
  int64_t D;
  int R, L;
  Segments seg;
  IntVec ranks;
  float* part;  // [split, M, R]
  int64_t M;
  int split;
  int64_t d_chunk;  // columns of P per split, a multiple of 32
  IntVec direct = {};  // register kernels only: the raw indices for direct mode (see rows_direct_ok)
};
int sgmv_shrink_split(int64_t M, int L, int64_t D, int R, int sm_count, int64_t* d_chunk);
cudaError_t sgmv_shrink(DType dtype, const SgmvShrinkArgs& a, cudaStream_t stream);

// out[i, d] = s[l] * sum_{c < r_l} S[i, c] * V_l(c, d),  S[i] = sum_s part[s, i]   (0 for "no adapter")
//   V_l(c, d) with either unit stride along c (forward: V = B [L, N, R], stride_d = R) or along d
//   (backward dx = G @ A: V = A [L, R, K], stride_c = K). s_out [M, R] (optional) receives S.
struct SgmvExpandArgs {
  const float* part;
  int split;
  const void* V;
  bool v_c_contiguous;
  int64_t D;
  int R, L;
  Segments seg;
  IntVec ranks;
  const float* scales;
  void* out;
  int64_t stride_om;
  float* s_out;
  int64_t M;
  IntVec direct = {};  // register kernels only: the raw indices for direct mode (see rows_direct_ok)
};
cudaError_t sgmv_expand(DType dtype, const SgmvExpandArgs& a, int sm_count, cudaStream_t stream);

// Register kernels of the segment regime's forward (16-bit types, r_max <= 64, aligned rows): the
// same shrink (P = x, W = A with d contiguous) and expand (V = B with c contiguous) as above, with
// the tensor-core operands loaded straight from global memory into registers (mma.sync m16n8k16)
// instead of through shared-memory tiles, for segments of a few rows (decode batches: 8 rows of an
// adapter read 128 KB of it, a 64 x 64 tile would be 7/8 padding). rows_kernels_ok says whether a
// call qualifies (its pointers, strides and sizes); the split of the shrink's D is its own.
bool rows_kernels_ok(DType dtype, const void* x, int64_t stride_xm, int64_t K, const void* A, const void* B, int R,
                     const void* y, int64_t stride_ym, int64_t N);
// blocks_per_sm: the grid each launcher aims at (0: its measured default).
int rows_shrink_split(int64_t M, int L, int64_t D, int sm_count, int64_t* d_chunk, int blocks_per_sm = 0);
// pf_idx: for a call that sorted its rows just before (the raw indices; ptr == nullptr: none), the
// shrink prefetches x's rows and the used adapters' A into L2 while the sort runs (rows_prefetch).
cudaError_t rows_shrink(DType dtype, const SgmvShrinkArgs& a, cudaStream_t stream, IntVec pf_idx = {});
cudaError_t rows_expand(DType dtype, const SgmvExpandArgs& a, int sm_count, cudaStream_t stream,
                        int blocks_per_sm = 0);
// Direct mode of the register kernels, for a call that would sort its rows (no segments given):
// no sort at all. Their tile slots [0, L] are the groups themselves, slot g taking group g's first
// kTileRows rows, and slot L + 1 + k the k-th tile past its group's first (groups in order, tiles by
// position: the sort's order); each block finds its rows from the raw indices (args.direct), whose
// key counts the slots past L also take. The same rows in the same order as the sorted mode, so the
// same results bit for bit. args.seg holds only n_tiles_max. Grids: (split or column chunks,
// L + 1 + max_overflow_tiles(M)); the shrink's launch is serial (it reads x at once).
constexpr int64_t kDirectMaxRows = 1024;  // each block reads all the indices: 8 per thread
constexpr int kDirectMaxGroups = 256;     // L + 1: blocks of the groups themselves per split / chunk
// Whether a call that sorts should use direct mode (sizes within the bounds above,
// LORA_KERNELS_MULTI_DIRECT != 0).
bool rows_direct_ok(int64_t M, int L);

// Adapters the shrink's prefetch can track (one shared-memory byte each).
constexpr int kPrefetchMaxAdapters = 1024;
// Whether prefetching `bytes` (x's rows and the used adapters' A) pays for a call that sorts.
bool rows_prefetch_worth(int64_t bytes);

// Per-adapter sum over that adapter's rows only, in sorted (= original, the sort is stable) row order:
//   out[l, p, q] = s[l] * sum_{i : idx[i] = l} U[i, p] * V[i, q]
// dA = seg_outer(U = G [M, R], V = x [M, K]) with the rank limiting p;
// dB = seg_outer(U = dy [M, N], V = S [M, R]) with the rank limiting q.
// U and V are in the adapter dtype (the caller rounds the fp32 G and S), rows contiguous.
// With split > 1 the rows of each adapter are cut into `split` runs written to ws [split, L, P, Q]
// (fp32, scaled), to be summed by the caller; else out [L, P, Q] is written in the adapter dtype.
struct SegOuterArgs {
  const void* U;
  int64_t stride_um;
  const void* V;
  int64_t stride_vm;
  int64_t P, Q;
  int R, L;
  bool rank_on_p;
  Segments seg;
  IntVec ranks;
  const float* scales;
  void* out;
  float* ws;
  int split;
  int64_t M;
};
int seg_outer_split(int64_t M, int L, int64_t P, int64_t Q, int sm_count);
cudaError_t seg_outer(DType dtype, const SegOuterArgs& a, cudaStream_t stream);

// out [M, L * R] in dtype: row i holds s_l * U[i, :r_l] (U [M, R] fp32) in the column block of its
// adapter l, zeros elsewhere; dA and dB are then one dense GEMM each (see spread_rows_kernel).
bool spread_rows_worth(int L, int R);
cudaError_t spread_rows(DType dtype, const float* U, IntVec idx, IntVec ranks, const float* scales, void* out,
                        int64_t M, int R, int L, cudaStream_t stream);

}  // namespace lora_kernels
