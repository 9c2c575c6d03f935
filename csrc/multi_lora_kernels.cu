// Multi-adapter LoRA kernels (see multi_lora_kernels.cuh for the maths and every tensor's shape).
//
// File order: device helpers -> decode-regime kernels (BGMV) -> segment metadata -> tile GEMM
// building blocks -> segment-regime kernels (SGMV shrink / expand, per-adapter reductions) ->
// host launchers. Everything accumulates in fp32.
#include "multi_lora_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

namespace lora_kernels {
namespace {

// =============================================================================================
// device helpers
// =============================================================================================
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, typename S>
__device__ __forceinline__ T convert(S v) {
  if constexpr (std::is_same<T, S>::value) {
    return v;
  } else {
    return from_f<T>(to_f(v));
  }
}

// Elements in one 16-byte vector access: 8 for bf16/fp16, 4 for fp32.
template <typename T>
__host__ __device__ constexpr int vec_elems() { return 16 / static_cast<int>(sizeof(T)); }

// 16-byte vector accesses (p must be 16-byte aligned); the bytes move between the vector and typed
// registers through memcpy (a register move after compilation), never through a pointer cast on a local.
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// Asynchronous 16-byte global -> shared copies (sm_80+ cp.async.cg: bypasses L1, the tiles are
// streamed once). They let a block issue the loads of step s + 2 before it computes step s, so that
// a 64-row tile keeps ~10 KB in flight instead of the 5 KB of one synchronous step. Elsewhere (the
// host pass, the CPU emulation) a plain 16-byte copy: same result, no overlap.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  st16(smem, ld16(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N of this thread's committed groups are still in flight (then __syncthreads
// makes every thread's copies visible to the block).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_overlapped (host side) may
// start while the kernel before it in the stream still runs; grid_dep_wait() blocks until that
// kernel has completed and its writes are visible, and grid_dep_launch_dependents() lets the next
// overlapped launch start. Rule kept by every kernel here: wait before touching anything the
// previous kernel writes, and trigger only after the wait (so a started dependent knows that
// everything before its own predecessor is complete). Elsewhere: no-ops, launches are serial.
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Bring [p, p + bytes) into L2 (p 16-byte aligned, bytes a multiple of 16): one instruction, handed
// to the SM's bulk-copy unit; no registers, no data back, nothing to wait for. A hint: it changes
// no result. The CPU emulation records the range instead, so its tests can check every prefetch
// stays inside the tensors.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(static_cast<uint32_t>(bytes)) : "memory");
#elif defined(LORA_KERNELS_EMU)
  emu::record_prefetch(p, bytes);
#endif
}

template <typename T>
__device__ __forceinline__ void load_vec_f32(const T* p, float* out) {
  const uint4 raw = ld16(p);
  T e[vec_elems<T>()];
  memcpy(e, &raw, sizeof(raw));
#pragma unroll
  for (int u = 0; u < vec_elems<T>(); ++u) out[u] = to_f(e[u]);
}

template <typename I>
__device__ __forceinline__ I dmin(I a, I b) { return a < b ? a : b; }
template <typename I>
__device__ __forceinline__ I dmax(I a, I b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int64_t read_int(IntVec v, int64_t i) {
  return v.is64 ? static_cast<const int64_t*>(v.ptr)[i] : static_cast<const int32_t*>(v.ptr)[i];
}

// The adapter of row i, or -1 for no adapter: any value outside [0, L) counts as none, so a bad
// index never turns into an address.
__device__ __forceinline__ int adapter_of(IntVec idx, int64_t i, int L) {
  const int64_t l = read_int(idx, i);
  return (l >= 0 && l < L) ? static_cast<int>(l) : -1;
}

// Rank of adapter l clamped to [0, R] (R when no ranks were given).
__device__ __forceinline__ int rank_of(IntVec ranks, int l, int R) {
  if (ranks.ptr == nullptr) return R;
  const int64_t r = read_int(ranks, l);
  return r < 0 ? 0 : (r > R ? R : static_cast<int>(r));
}

// =============================================================================================
// decode regime (BGMV): one row at a time
// =============================================================================================
// Shrink: block (i, s) stages x[i, k-chunk s] in shared memory (fp32) once, then each warp takes
// rank rows j = warp, warp + 8, ... and streams A[l, j, k-chunk] with 16-byte loads, reducing
// with shuffles. 256 threads: 8 warps cover r = 16 in two passes; the x chunk (<= 32 KB) is read
// from global memory once per block whatever the rank.
//
// Why the decode regime is far from HBM bandwidth once rows share adapters (H100, bf16, K = N =
// 4096, r = 16; an adapter's A or B is 128 KB): every row re-reads its adapter, from L2 when
// another row brought it in. T = 1024 rows over 128 adapters moves 48 MB from HBM (x 8 MB, y 8 MB,
// adapters 32 MB) but 1024 x 2 x 128 KB = 256 MB through L2 -> SM; at the ~5-7 TB/s an H100's L2
// delivers that is 37-50 us, against the 75 us measured and 16 us at HBM speed. T = 256 over 32
// adapters: 12 MB from HBM (4 us at HBM speed) but 64 MB through L2 (9-12 us) plus two kernels'
// ramp, 24 us measured. No tuning of this kernel gets under the L2 traffic: only reading an
// adapter once for the rows that share it does (the segment regime; see the regime rule in
// lora_kernels/ops/multi_lora.py). This regime is for few rows per adapter (T < 128, or fewer
// than ~512 / r rows per adapter), where its L2 re-reads are few and it needs no sort.
constexpr int kShrinkThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) bgmv_shrink_kernel(BgmvShrinkArgs a, bool vec) {
  extern __shared__ float xs[];  // [k_chunk]
  constexpr int V = vec_elems<T>();
  const int64_t i = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(s) * a.k_chunk;
  const int kn = static_cast<int>(dmax<int64_t>(0, dmin<int64_t>(a.k_chunk, a.K - k0)));
  float* out = a.part + (static_cast<int64_t>(s) * a.M + i) * a.R;
  const int l = adapter_of(a.idx, i, a.L);
  const int r = (l < 0 || kn == 0) ? 0 : rank_of(a.ranks, l, a.R);
  for (int j = r + threadIdx.x; j < a.R; j += blockDim.x) out[j] = 0.f;
  if (r == 0) return;

  const T* xr = static_cast<const T*>(a.x) + i * a.stride_xm + k0;
  if (vec) {  // kn % V == 0: K % V == 0 and k_chunk % 256 == 0
    for (int v = threadIdx.x; v < kn / V; v += blockDim.x) load_vec_f32(xr + v * V, xs + v * V);
  } else {
    for (int k = threadIdx.x; k < kn; k += blockDim.x) xs[k] = to_f(xr[k]);
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const T* Al = static_cast<const T*>(a.A) + static_cast<int64_t>(l) * a.R * a.K + k0;
  for (int j = warp; j < r; j += kShrinkThreads / 32) {  // warp-uniform: full-mask shuffles are safe
    const T* arow = Al + static_cast<int64_t>(j) * a.K;
    float acc = 0.f;
    if (vec) {
      const int nv = kn / V;
#pragma unroll 4
      for (int v = lane; v < nv; v += 32) {  // 4 independent 16-byte loads in flight per lane
        float av[V];
        load_vec_f32(arow + v * V, av);
        const float* xv = xs + v * V;
#pragma unroll
        for (int u = 0; u < V; ++u) acc = fmaf(av[u], xv[u], acc);
      }
    } else {
      for (int k = lane; k < kn; k += 32) acc = fmaf(to_f(arow[k]), xs[k], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[j] = acc;
  }
}

// Expand: block (i, n-range). S[i] (sum of the split partials) goes to shared memory; then groups
// of G lanes share one output column n, each lane reading 16 bytes of the contiguous row B[l, n, :]
// so that a warp reads 512 contiguous bytes (r = 16 bf16: G = 2, 16 columns per warp).
constexpr int kExpandThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kExpandThreads)
    bgmv_expand_kernel(BgmvExpandArgs a, int64_t n_per_block, int lanes_log2, bool vec) {
  __shared__ float ss[kMaxRank];
  const int64_t i = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * n_per_block;
  const int64_t n1 = dmin(a.N, n0 + n_per_block);
  const int l = adapter_of(a.idx, i, a.L);
  const int r = l < 0 ? 0 : rank_of(a.ranks, l, a.R);
  for (int j = threadIdx.x; j < a.R; j += blockDim.x) {
    float v = 0.f;
    if (j < r) {
      for (int p = 0; p < a.split; ++p) v += a.part[(static_cast<int64_t>(p) * a.M + i) * a.R + j];
    }
    ss[j] = v;
    if (a.s_out != nullptr && blockIdx.y == 0) a.s_out[i * a.R + j] = v;
  }
  __syncthreads();

  T* yr = static_cast<T*>(a.y) + i * a.N;
  if (r == 0) {
    for (int64_t n = n0 + threadIdx.x; n < n1; n += blockDim.x) yr[n] = from_f<T>(0.f);
    return;
  }
  const float scale = a.scales[l];
  const T* Bl = static_cast<const T*>(a.B) + static_cast<int64_t>(l) * a.N * a.R;
  if (vec) {  // R % V == 0: every row of B starts 16-byte aligned
    constexpr int V = vec_elems<T>();
    const int G = 1 << lanes_log2;
    const int q = threadIdx.x & (G - 1);
    const int group = threadIdx.x >> lanes_log2;
    const int groups = blockDim.x >> lanes_log2;
    const int nvec = (r + V - 1) / V;  // vectors holding ranks < r: columns past the rank are not read
    for (int64_t nb = n0; nb < n1; nb += groups) {  // same trip count for every thread of the block
      const int64_t n = nb + group;
      float acc = 0.f;
      if (n < n1) {
        const T* brow = Bl + n * a.R;
        for (int v = q; v < nvec; v += G) {
          float bv[V];
          load_vec_f32(brow + v * V, bv);
#pragma unroll
          for (int u = 0; u < V; ++u) {
            const int j = v * V + u;
            if (j < r) acc = fmaf(bv[u], ss[j], acc);  // not 0 * B: B may hold anything past the rank
          }
        }
      }
      for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (n < n1 && q == 0) yr[n] = from_f<T>(scale * acc);
    }
  } else {
    for (int64_t n = n0 + threadIdx.x; n < n1; n += blockDim.x) {
      const T* brow = Bl + n * a.R;
      float acc = 0.f;
      for (int j = 0; j < r; ++j) acc = fmaf(to_f(brow[j]), ss[j], acc);
      yr[n] = from_f<T>(scale * acc);
    }
  }
}

// =============================================================================================
// segment metadata
// =============================================================================================
__global__ void make_keys_kernel(IntVec idx, int64_t M, int L, int32_t* keys) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = read_int(idx, i);
    keys[i] = (v >= 0 && v < L) ? static_cast<int32_t>(v) : L;
  }
}

__device__ __forceinline__ int64_t lower_bound(const int32_t* a, int64_t n, int key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

constexpr int kSegThreads = 1024;

// tile_start[g] = sum over g' < g of ceil(rows(g') / kTileRows) for g = 0 .. L + 1: a block-wide
// exclusive scan over the L + 1 groups (the last one "no adapter"), NT groups at a time. rows(g)
// is called once per group g <= L, by one thread.
template <int NT, typename Rows>
__device__ __forceinline__ void scan_tiles(int L, Rows rows, int32_t* tile_start,
                                           typename cub::BlockScan<int, NT>::TempStorage& tmp) {
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int groups = L + 1;
  for (int base = 0; base < groups; base += NT) {
    const int g = base + threadIdx.x;
    const int tiles = g < groups ? static_cast<int>((rows(g) + kTileRows - 1) / kTileRows) : 0;
    int prefix = 0, total = 0;
    cub::BlockScan<int, NT>(tmp).ExclusiveSum(tiles, prefix, total);
    if (g < groups) tile_start[g] = carry + prefix;
    __syncthreads();  // every thread has read carry (and tmp may be reused)
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) tile_start[groups] = carry;
}

// One block: group g's rows are [lower_bound(g), lower_bound(g + 1)) of the sorted keys, and a
// block-wide exclusive scan of ceil(count / kTileRows) gives each group's first tile. O(L log M)
// work, a few microseconds for L in the thousands.
__global__ void __launch_bounds__(kSegThreads)
    build_segments_kernel(const int32_t* sorted_keys, int64_t M, int L, int32_t* seg_start, int32_t* tile_start) {
  __shared__ typename cub::BlockScan<int, kSegThreads>::TempStorage tmp;
  auto rows = [&](int g) {
    const int64_t b = lower_bound(sorted_keys, M, g);
    seg_start[g] = static_cast<int32_t>(b);
    return lower_bound(sorted_keys, M, g + 1) - b;
  };
  scan_tiles<kSegThreads>(L, rows, tile_start, tmp);
  if (threadIdx.x == 0) seg_start[L + 1] = static_cast<int32_t>(M);
}

// make_keys, the stable sort and build_segments in one block, for M <= kSortMaxRows rows past 255
// adapters, past 1024 rows before sm_90, or with LORA_KERNELS_MULTI_SORT=radix (the counting sort
// below otherwise): at decode batch sizes the three launches (and the sort's own) cost more than
// the kernels that use them (an H100 runs a launch of a captured graph in ~2-3 us). kItems rows per
// thread in the blocked arrangement (thread t holds rows t * kItems ..), radix-sorted on the key's
// bits only (4-bit passes); the sort is stable, so equal keys keep their row order.
constexpr int kSortThreads = 512;

template <int kItems>
__global__ void __launch_bounds__(kSortThreads)
    sort_segments_kernel(IntVec idx, int64_t M, int L, int end_bit, int64_t* perm, int32_t* seg_start,
                         int32_t* tile_start) {
  using Sort = cub::BlockRadixSort<int, kSortThreads, kItems, int>;
  using Scan = cub::BlockScan<int, kSortThreads>;  // scan_tiles' storage
  __shared__ union {
    typename Sort::TempStorage sort;
    int keys[kSortThreads * kItems];  // the sorted keys, once the sort is done
    typename Scan::TempStorage scan;  // the tile scan, once the keys are done
  } sm;
  grid_dep_launch_dependents();  // the shrink may start; it waits for this sort's tables
  const int pad = L + 1;  // past the "no adapter" group L: padding sorts last
  int keys[kItems], vals[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = static_cast<int64_t>(threadIdx.x) * kItems + j;
    keys[j] = pad;
    if (i < M) {
      const int64_t v = read_int(idx, i);
      keys[j] = (v >= 0 && v < L) ? static_cast<int>(v) : L;
    }
    vals[j] = static_cast<int>(i);
  }
  Sort(sm.sort).Sort(keys, vals, 0, end_bit);
  __syncthreads();  // the sort's storage becomes the key array
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t p = static_cast<int64_t>(threadIdx.x) * kItems + j;
    sm.keys[p] = keys[j];
    if (p < M) perm[p] = vals[j];
  }
  __syncthreads();
  // Group g starts at the first sorted position whose key is >= g: position p starts the groups
  // (key[p - 1], key[p]] (key[-1] = -1, key[M] = L + 1), so every g in [0, L + 1] is written once.
  for (int64_t p = threadIdx.x; p <= M; p += kSortThreads) {
    const int prev = p > 0 ? sm.keys[p - 1] : -1;
    const int cur = p < M ? sm.keys[p] : pad;
    for (int g = prev + 1; g <= cur; ++g) seg_start[g] = static_cast<int32_t>(p);
  }
  __syncthreads();  // seg_start is visible to the block; the key array becomes the scan's storage
  scan_tiles<kSortThreads>(L, [&](int g) { return seg_start[g + 1] - seg_start[g]; }, tile_start, sm.scan);
}

// The same tables for up to 256 groups (L <= 255), by a counting sort, one row per thread: one
// block of 1024 threads up to 1024 rows, else a thread-block cluster (sm_90) of C = ceil(M / 1024)
// blocks, C <= 8 (the portable cluster size: M <= kSortMaxRows). A row's sorted position is
//   seg_start[g] + (rows of g in the blocks before its own) + (rows of g in its block's warps
//   before its own) + (lanes below it in its warp with key g),
// the row order within each group, so the sort is stable. The last term comes from one ballot per
// key bit; a block scan over (group, warp), group-major, gives the block's own sorted order; each
// block's count of each group goes to every block of the cluster (distributed shared memory, one
// cluster barrier), and a block scan over the groups (rows and tiles packed in one int) gives
// seg_start and tile_start. Rows are staged in shared memory in the block's sorted order and
// written from there: each group's rows of a block are one contiguous run of perm.
// Why (H100, graph of 20 sorts): the radix sort took 9.6 us at T4096 L128 (2 passes x (rank, 2
// exchanges through shared memory)), ~9 us of the call's 61; a one-block counting sort 5.6 us, of
// which ranking 4 rows per thread took ~1.8 us on the block's one SM. (__match_any_sync instead of
// the ballots: 11.4 us at T4096 on 128 adapters, 4.2 on one: its cost grows with the distinct
// keys in the warp.)
constexpr int kCountSortThreads = 1024;  // 32 warps; the (group, warp) scan gives each group 4 threads
constexpr int kCountSortMaxGroups = kCountSortThreads / 4;
constexpr int kCountSortMaxBlocks = 8;   // the portable cluster size
constexpr int kCountSortStride = 257;    // cnt's row per warp: odd, so the group threads' reads do not conflict
static_assert(kSortMaxRows <= kCountSortThreads * kCountSortMaxBlocks, "one row per thread of the cluster");

// The lanes of the warp whose key (in [0, 2^kBits), or -1: none) equals this lane's: one ballot per
// bit. ballot ^ (bit - 1) is the ballot where this lane's bit is 1 and its complement where it is 0.
template <int kBits>
__device__ __forceinline__ unsigned same_key_lanes(int key) {
  unsigned peers = __ballot_sync(0xffffffffu, key >= 0);
#pragma unroll
  for (int b = 0; b < kBits; ++b) {
    const int bit = (key >> b) & 1;
    peers &= __ballot_sync(0xffffffffu, bit != 0) ^ static_cast<unsigned>(bit - 1);
  }
  return peers;
}

// Inclusive sum over the warp's lanes in lane order (every lane of a full warp calls it).
__device__ __forceinline__ int warp_incl_sum(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += n;
  }
  return v;
}

// Exclusive sum over the block's 1024 threads in thread order; *total = the sum of all. Two
// barriers; the first one comes after every thread's code before the call.
__device__ __forceinline__ int block_excl_sum_1024(int v, int* total) {
  __shared__ int warp_sums[33];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int inc = warp_incl_sum(v);
  if (lane == 31) warp_sums[w] = inc;
  __syncthreads();
  if (w == 0) {  // the warps' sums, scanned by one warp
    const int t = warp_sums[lane];
    const int ti = warp_incl_sum(t);
    __syncwarp();  // every lane has read its warp sum before the prefixes overwrite them
    warp_sums[lane] = ti - t;
    if (lane == 31) warp_sums[32] = ti;
  }
  __syncthreads();
  *total = warp_sums[32];
  return warp_sums[w] + inc - v;
}

// Thread-block clusters (sm_90): the block's rank in its cluster; a barrier over the cluster's
// threads in two halves (arrive, then wait until every thread has arrived: with release / acquire,
// shared-memory writes before the arrive, remote ones included, are visible to the whole cluster
// after the wait; relaxed, it only says that the thread's block has started, which a block must
// know of another before touching its shared memory); and a store into the shared memory of block
// `rank` at the address of p in this one. count_sort_segments_kernel<true> runs on sm_90+ only.
__device__ __forceinline__ int cluster_block_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}
__device__ __forceinline__ void cluster_store(int* p, int rank, int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(remote), "r"(v) : "memory");
#else
  (void)rank;
  *p = v;
#endif
}

template <bool kCluster>
__global__ void __launch_bounds__(kCountSortThreads)
    count_sort_segments_kernel(IntVec idx, int64_t M, int L, int64_t* perm, int32_t* seg_start, int32_t* tile_start) {
  __shared__ uint16_t cnt[32 * kCountSortStride];  // [warp][group]: rows, then block-sorted position of the first
  __shared__ uint32_t staged[kCountSortThreads];   // key << 16 | row in the block, at block-sorted positions
  __shared__ int shift[kCountSortMaxGroups];       // sorted position - block-sorted position, per group
  __shared__ int rows_in[kCluster ? kCountSortMaxBlocks : 1][kCountSortMaxGroups];  // [block][group] (cluster)
  __shared__ int block_first[kCluster ? kCountSortMaxGroups : 1];  // block-sorted position of each group's first
  grid_dep_launch_dependents();  // the shrink may start; it waits for this sort's tables
  if (kCluster) cluster_arrive_relaxed();  // this block has started (waited on before the remote stores)
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int blk = kCluster ? cluster_block_rank() : 0, blocks = kCluster ? static_cast<int>(gridDim.x) : 1;
  const int groups = L + 1;  // adapters 0 .. L - 1, then L: no adapter (-1 or out of range)
  const int64_t row0 = static_cast<int64_t>(blk) * kCountSortThreads;  // the grid is one cluster
  int key = -1;  // past M: in no group
  if (row0 + threadIdx.x < M) {
    const int64_t v = read_int(idx, row0 + threadIdx.x);
    key = (v >= 0 && v < L) ? static_cast<int>(v) : L;
  }
  uint16_t* my_cnt = cnt + w * kCountSortStride;
  for (int g = lane; g < groups; g += 32) my_cnt[g] = 0;  // a warp's own row: no block barrier needed
  __syncwarp();
  const unsigned peers = L < 16 ? same_key_lanes<4>(key) : same_key_lanes<8>(key);
  const int rank = __popc(peers & ((1u << lane) - 1u));  // lanes below with the same key
  if (key >= 0 && rank == 0) my_cnt[key] = static_cast<uint16_t>(__popc(peers));
  __syncthreads();
  {  // thread t: group g = t / 4, warps 8q .. 8q + 7 (q = t % 4); thread order is (group, warp) order
    const int g = threadIdx.x >> 2, q = threadIdx.x & 3;
    int c[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      c[j] = g < groups ? cnt[(8 * q + j) * kCountSortStride + g] : 0;
      sum += c[j];
    }
    int rows = sum + __shfl_xor_sync(0xffffffffu, sum, 1);  // the group's rows in the block
    rows += __shfl_xor_sync(0xffffffffu, rows, 2);
    // one block: packed tiles x 2^16 + rows (rows <= 1024, tiles <= 16 + 256); a cluster: rows
    const int tiles = !kCluster && q == 0 ? (rows + kTileRows - 1) / kTileRows : 0;
    int total = 0;
    const int before = block_excl_sum_1024((tiles << 16) + sum, &total);  // its barriers: reads above, writes below
    int pos = before & 0xffff;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (g < groups) cnt[(8 * q + j) * kCountSortStride + g] = static_cast<uint16_t>(pos);
      pos += c[j];
    }
    if (kCluster) cluster_wait();  // every block of the cluster has started
    if (q == 0 && g < groups) {
      if (kCluster) {
        block_first[g] = before;
        for (int b = 0; b < blocks; ++b) cluster_store(&rows_in[blk][g], b, rows);
      } else {
        shift[g] = 0;
        seg_start[g] = before & 0xffff;
        tile_start[g] = before >> 16;
      }
    }
    if (!kCluster && threadIdx.x == 0) {
      seg_start[groups] = static_cast<int32_t>(M);
      tile_start[groups] = total >> 16;
    }
  }
  if (kCluster) {
    cluster_arrive();  // every block's rows_in rows (and this block's cnt) complete; no remote access after
    cluster_wait();
    int all = 0, earlier = 0;  // thread g: group g's rows in the cluster, and in the blocks before this one
    const int g = threadIdx.x;
    if (g < groups) {
      for (int b = 0; b < blocks; ++b) {
        all += rows_in[b][g];
        earlier += b < blk ? rows_in[b][g] : 0;
      }
    }
    // packed: tiles x 2^16 + rows; rows <= kSortMaxRows < 2^16, tiles <= M / 64 + 256 < 2^15
    int total = 0;
    const int scan = block_excl_sum_1024(g < groups ? (((all + kTileRows - 1) / kTileRows) << 16) + all : 0, &total);
    if (g < groups) {
      shift[g] = (scan & 0xffff) + earlier - block_first[g];
      if (blk == 0) {
        seg_start[g] = scan & 0xffff;
        tile_start[g] = scan >> 16;
      }
    }
    if (blk == 0 && g == 0) {
      seg_start[groups] = static_cast<int32_t>(M);
      tile_start[groups] = total >> 16;
    }
  } else {
    __syncthreads();  // cnt holds block-sorted positions
  }
  if (key >= 0) staged[my_cnt[key] + rank] = static_cast<uint32_t>(key) << 16 | threadIdx.x;
  __syncthreads();
  const int64_t rows_here = M - row0 < kCountSortThreads ? M - row0 : kCountSortThreads;
  if (static_cast<int64_t>(threadIdx.x) < rows_here) {  // block-sorted position threadIdx.x
    const uint32_t e = staged[threadIdx.x];
    perm[shift[e >> 16] + static_cast<int>(threadIdx.x)] = row0 + (e & 0xffff);
  }
}

struct Tile {
  int g;             // adapter, or L for rows without one
  int64_t begin;     // sorted positions [begin, end), at most kTileRows
  int64_t end;
};

// Tile t -> the group g with tile_start[g] <= t < tile_start[g + 1] (binary search over L + 2
// entries, ~7 L1-resident loads at L = 128). False past the last tile: the grid is an upper bound.
__device__ __forceinline__ bool find_tile(int64_t t, const Segments& s, int L, Tile& out) {
  const int groups = L + 1;
  if (t >= s.tile_start[groups]) return false;
  int lo = 0, hi = groups - 1;  // tile_start[0] = 0 <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s.tile_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  out.g = lo;
  out.begin = s.seg_start[lo] + (t - s.tile_start[lo]) * kTileRows;
  out.end = dmin(static_cast<int64_t>(s.seg_start[lo + 1]), out.begin + kTileRows);
  return true;
}

// find_tile with a warp's 32 lanes probing at once (every lane of a full warp calls it; all get the
// same answer). Up to kLookupOneRound groups, one round trip: lane i loads tile_start and seg_start
// at positions i, i + 32, ... all at once, a ballot counts the positions p in [1, groups) with
// tile_start[p] <= t (that count is the tile's group: tile_start is nondecreasing), and shuffles
// hand every lane the entries of that group. Else log32 rounds of one load each. Why: the register
// kernels' blocks are short (a few microseconds) and start with this lookup on their critical path;
// a binary search was 8 dependent loads at L = 128, the multi-round probe 3-4 (the bound check, 2
// probe rounds, then seg_start), ~0.5 us each on an H100.
constexpr int kLookupOneRound = 255;  // groups (L + 1): positions 0 .. groups fit 8 loads per lane

__device__ __forceinline__ int warp_pick(const int (&v)[8], int p) {  // position p = 32 j + lane's value; p uniform
  // a shuffle per j and a select (a select of v[j] before one shuffle compiles to a dynamically
  // indexed array in local memory)
  int got = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int x = __shfl_sync(0xffffffffu, v[j], p & 31);
    got = j == (p >> 5) ? x : got;
  }
  return got;
}

__device__ __forceinline__ bool find_tile_warp(int64_t t, const Segments& s, int L, Tile& out) {
  const int groups = L + 1;
  const int lane = threadIdx.x & 31;
  if (groups <= kLookupOneRound) {
    int ts[8], ss[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // tile_start / seg_start have groups + 1 entries
      const int p = lane + 32 * j;
      ts[j] = p <= groups ? s.tile_start[p] : 0;
      ss[j] = p <= groups ? s.seg_start[p] : 0;
    }
    if (t >= warp_pick(ts, groups)) return false;
    int lo = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int p = lane + 32 * j;
      lo += __popc(__ballot_sync(0xffffffffu, p >= 1 && p < groups && ts[j] <= t));
    }
    out.g = lo;
    out.begin = warp_pick(ss, lo) + (t - warp_pick(ts, lo)) * kTileRows;
    out.end = dmin(static_cast<int64_t>(warp_pick(ss, lo + 1)), out.begin + kTileRows);
    return true;
  }
  if (t >= s.tile_start[groups]) return false;
  int lo = 0, hi = groups - 1;  // the answer (the last g with tile_start[g] <= t) is in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 32) / 32;  // 32 probes lo + step, lo + 2 step, ... cover [lo, hi]
    const int pos = lo + (lane + 1) * step;
    const bool le = pos <= hi && s.tile_start[pos] <= t;  // true on a prefix of the lanes
    const int cnt = __popc(__ballot_sync(0xffffffffu, le));
    hi = dmin(hi, lo + (cnt + 1) * step - 1);
    lo += cnt * step;
  }
  out.g = lo;
  out.begin = s.seg_start[lo] + (t - s.tile_start[lo]) * kTileRows;
  out.end = dmin(static_cast<int64_t>(s.seg_start[lo + 1]), out.begin + kTileRows);
  return true;
}

// =============================================================================================
// tile GEMM building blocks: C[BM, BN] += A[BM, BK] @ B[BK, BN] from shared memory
// =============================================================================================
// 64 x 64 output tiles, 32-deep steps, 4 warps: the rank of most adapters (16..64) fits one or two
// steps of the expand, and 64 rows is a sequence chunk in prefill. The shared tiles of one block
// take 27 KB (16-bit), so several blocks share an SM and hide each other's load latency.
constexpr int BM = kTileRows;
constexpr int BN = 64;
constexpr int BK = 32;
constexpr int kTileThreads = 128;
constexpr int LDC = BN + 4;  // fp32 staging of C; +4 floats keeps 16-byte rows and spreads banks

// A is stored [BM][BK] (A_ROW) or [BK][BM]; B is stored [BN][BK] (B_COL) or [BK][BN]. Rows are
// padded by 8 elements (16 bytes for 16-bit types) against bank conflicts; every wmma fragment
// pointer stays 32-byte aligned (row pitches of 80 or 144 bytes times 16 rows).
template <typename T, bool A_ROW, bool B_COL>
struct SmemTiles {
  static constexpr int LDA = A_ROW ? BK + 8 : BM + 8;
  static constexpr int LDB = B_COL ? BK + 8 : BN + 8;
  static constexpr int A_ELEMS = A_ROW ? BM * LDA : BK * LDA;
  static constexpr int B_ELEMS = B_COL ? BN * LDB : BK * LDB;
};

// bf16 / fp16: tensor cores through wmma (16x16x16, fp32 accumulators); warps as 2 x 2, each
// owning a 32 x 32 quarter of the tile.
template <typename T, bool A_ROW, bool B_COL>
struct WmmaTile {
  using Lay = SmemTiles<T, A_ROW, B_COL>;
  using ALayout = typename std::conditional<A_ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  using BLayout = typename std::conditional<B_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void step(const T* As, const T* Bs, int lda = Lay::LDA, int ldb = Lay::LDB) {
    const int warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32;
    const int wn = (warp & 1) * 32;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm + 16 * i;
        nvcuda::wmma::load_matrix_sync(fa[i], A_ROW ? As + m * lda + kk : As + kk * lda + m, lda);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn + 16 * j;
        nvcuda::wmma::load_matrix_sync(fb[j], B_COL ? Bs + n * ldb + kk : Bs + kk * ldb + n, ldb);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) {
    const int warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32;
    const int wn = (warp & 1) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// fp32: plain FMAs (full fp32, no TF32), each thread an 8 x 4 block of the 64 x 64 tile.
template <bool A_ROW, bool B_COL>
struct SimtTile {
  using Lay = SmemTiles<float, A_ROW, B_COL>;
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* As, const float* Bs, int lda = Lay::LDA, int ldb = Lay::LDB) {
    const int m0 = (threadIdx.x >> 4) * 8;
    const int n0 = (threadIdx.x & 15) * 4;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = A_ROW ? As[(m0 + i) * lda + k] : As[k * lda + m0 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = B_COL ? Bs[(n0 + j) * ldb + k] : Bs[k * ldb + n0 + j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) {
    const int m0 = (threadIdx.x >> 4) * 8;
    const int n0 = (threadIdx.x & 15) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(m0 + i) * LDC + n0 + j] = acc[i][j];
  }
};

template <typename T, bool A_ROW, bool B_COL>
using TileMma = typename std::conditional<std::is_same<T, float>::value, SimtTile<A_ROW, B_COL>,
                                          WmmaTile<T, A_ROW, B_COL>>::type;

// sm[o * ld + i] = row(o)[i] converted to T, for o < outer_ok and i < inner_ok; 0 elsewhere in the
// OUTER x INNER tile. row(o) points at the first element of outer line o (inner stride 1); it is
// only called for o < outer_ok. With vec, row(o) + i is 16-byte aligned for every i % V == 0.
template <typename T, typename TS, int OUTER, int INNER, typename RowPtr>
__device__ __forceinline__ void load_tile(T* sm, int ld, RowPtr row, int outer_ok, int inner_ok, bool vec) {
  constexpr int V = vec_elems<TS>();
  static_assert(INNER % V == 0, "tile width must hold whole vectors");
  if (vec) {
    constexpr int VPR = INNER / V;
    for (int e = threadIdx.x; e < OUTER * VPR; e += blockDim.x) {
      const int o = e / VPR;
      const int i = (e % VPR) * V;
      T* dst = sm + o * ld + i;
      if (o < outer_ok && i + V <= inner_ok) {
        const uint4 raw = ld16(row(o) + i);
        if constexpr (std::is_same<T, TS>::value) {
          st16(dst, raw);  // dst is 16-byte aligned: pitches are multiples of 16 bytes
        } else {
          TS src[V];
          memcpy(src, &raw, sizeof(raw));
#pragma unroll
          for (int u = 0; u < V; ++u) dst[u] = convert<T>(src[u]);
        }
      } else {
        const bool ok = o < outer_ok;
#pragma unroll
        for (int u = 0; u < V; ++u) dst[u] = (ok && i + u < inner_ok) ? convert<T>(row(o)[i + u]) : from_f<T>(0.f);
      }
    }
  } else {
    for (int e = threadIdx.x; e < OUTER * INNER; e += blockDim.x) {
      const int o = e / INNER;
      const int i = e % INNER;
      sm[o * ld + i] = (o < outer_ok && i < inner_ok) ? convert<T>(row(o)[i]) : from_f<T>(0.f);
    }
  }
}

// load_tile for TS == T through cp.async: whole in-bounds vectors are copied asynchronously (the
// caller commits the group and waits before reading), edges and padding are stored directly.
// Without vec every element is stored directly (misaligned rows: no 16-byte access is legal).
template <typename T, int OUTER, int INNER, typename RowPtr>
__device__ __forceinline__ void load_tile_async(T* sm, int ld, RowPtr row, int outer_ok, int inner_ok, bool vec) {
  constexpr int V = vec_elems<T>();
  static_assert(INNER % V == 0, "tile width must hold whole vectors");
  if (!vec) {
    load_tile<T, T, OUTER, INNER>(sm, ld, row, outer_ok, inner_ok, false);
    return;
  }
  constexpr int VPR = INNER / V;
  for (int e = threadIdx.x; e < OUTER * VPR; e += blockDim.x) {
    const int o = e / VPR;
    const int i = (e % VPR) * V;
    T* dst = sm + o * ld + i;
    if (o < outer_ok && i + V <= inner_ok) {
      cp_async16(dst, row(o) + i);
    } else {
      const bool ok = o < outer_ok;
#pragma unroll
      for (int u = 0; u < V; ++u) dst[u] = (ok && i + u < inner_ok) ? row(o)[i + u] : from_f<T>(0.f);
    }
  }
}

// The main loop of a kStages-deep cp.async ring: issue(step) loads one step's A and B tiles into slot
// step % kStages as one commit group (an empty group past the last step); steps s + 1 .. s + kStages - 1
// load while step s multiplies. Leaves the accumulated tile in Cs, which may alias the ring.
template <typename T, int kStages, int kStageElems, int kAElems, typename Mma, typename Issue>
__device__ __forceinline__ void ring_mma(T* ring, int n_steps, Issue& issue, float* Cs) {
  Mma mma;
  mma.zero();
#pragma unroll 1
  for (int st = 0; st < kStages - 1; ++st) issue(st);
#pragma unroll 1
  for (int step = 0; step < n_steps; ++step) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `step` have landed
    __syncthreads();               // everyone's have, and everyone is done with step - 1's slot
    issue(step + kStages - 1);     // refill the slot of step - 1
    const T* As = ring + (step % kStages) * kStageElems;
    mma.step(As, As + kAElems);
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is about to become Cs
  mma.store(Cs);
}

// =============================================================================================
// segment regime (SGMV)
// =============================================================================================
// Shrink, block (tile, rank block, split): part[s, rows, c0:c0+64] = P[rows, d-range] @ W_l[d-range, c0:c0+64]
// with the tile's rows gathered through perm. W_D: W_l is [R, D] with d contiguous (A), else
// [D, R] with c contiguous (B); either way the global loads run along the contiguous dimension.
//
// Why the first version ran at 13% of HBM bandwidth (T = 4096 rows over 128 adapters, r = 16,
// K = 4096, bf16; 96 MB to move, 0.254 ms): each step loaded a 64 x 32 tile of x (4 KB) and of A
// (1 KB at r = 16), waited for it behind a __syncthreads, then computed: one step's 5 KB in flight
// per block, ~3 blocks per SM, ~15 KB per SM, while 2.95 TB/s x ~0.8 us of latency / 132 SMs needs
// ~18 KB per SM *continuously*; load and compute never overlapped, so the SM idled every step.
// Now: kStages-deep cp.async ring (3 stages for 16-bit types: steps s + 1 and s + 2 are in flight
// while step s computes, ~10 KB per block) and a split of D sized for ~6 blocks per SM (see
// sgmv_shrink_split), i.e. ~50 KB in flight per SM; the C staging tile reuses the ring's memory.
template <typename T>
struct ShrinkSmem {
  static constexpr int kStages = sizeof(T) == 2 ? 3 : 2;  // fp32: 2 x 20 KB (48 KB of static shared memory)
};

template <typename T, bool W_D>
__global__ void __launch_bounds__(kTileThreads) sgmv_shrink_kernel(SgmvShrinkArgs a, bool vec_p, bool vec_w) {
  using Mma = TileMma<T, true, W_D>;
  using Lay = SmemTiles<T, true, W_D>;
  constexpr int kStages = ShrinkSmem<T>::kStages;
  constexpr int kStageElems = Lay::A_ELEMS + Lay::B_ELEMS;  // multiples of 64 elements: 128-byte aligned stages
  constexpr int kRingBytes = kStages * kStageElems * static_cast<int>(sizeof(T));
  constexpr int kBytes = kRingBytes > BM * LDC * 4 ? kRingBytes : BM * LDC * 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  __shared__ int rows[BM];
  T* ring = reinterpret_cast<T*>(smem);
  float* Cs = reinterpret_cast<float*>(smem);  // after the ring is drained

  Tile t;
  if (!find_tile(blockIdx.x, a.seg, a.L, t)) return;
  const int c0 = blockIdx.y * BN;
  const int s = blockIdx.z;
  const int64_t d_begin = static_cast<int64_t>(s) * a.d_chunk;
  const int64_t d_end = dmin(a.D, d_begin + a.d_chunk);
  const int g = t.g;
  const int r = g < a.L ? rank_of(a.ranks, g, a.R) : 0;
  const int nrows = static_cast<int>(t.end - t.begin);
  for (int e = threadIdx.x; e < BM; e += blockDim.x) rows[e] = e < nrows ? static_cast<int>(a.seg.perm[t.begin + e]) : 0;
  __syncthreads();

  const int c_ok = dmax(0, r - c0);  // rank columns of this block that carry values (block-uniform)
  const int n_steps = d_end > d_begin ? static_cast<int>((d_end - d_begin + BK - 1) / BK) : 0;
  if (c_ok > 0 && n_steps > 0) {
    const T* P = static_cast<const T*>(a.P);
    const T* Wl = static_cast<const T*>(a.W) + static_cast<int64_t>(g) * a.D * a.R;
    auto issue = [&](int step) {  // loads of one step into its ring slot, as one cp.async group
      if (step < n_steps) {
        T* As = ring + (step % kStages) * kStageElems;
        T* Bs = As + Lay::A_ELEMS;
        const int64_t d0 = d_begin + static_cast<int64_t>(step) * BK;
        const int d_ok = static_cast<int>(dmin<int64_t>(BK, d_end - d0));
        load_tile_async<T, BM, BK>(
            As, Lay::LDA, [&](int o) { return P + static_cast<int64_t>(rows[o]) * a.stride_pm + d0; }, nrows, d_ok,
            vec_p);
        if constexpr (W_D) {
          load_tile_async<T, BN, BK>(Bs, Lay::LDB, [&](int o) { return Wl + static_cast<int64_t>(c0 + o) * a.D + d0; },
                                     c_ok, d_ok, vec_w);
        } else {
          load_tile_async<T, BK, BN>(Bs, Lay::LDB, [&](int o) { return Wl + (d0 + o) * a.R + c0; }, d_ok, c_ok, vec_w);
        }
      }
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
    ring_mma<T, kStages, kStageElems, Lay::A_ELEMS, Mma>(ring, n_steps, issue, Cs);
  }
  __syncthreads();

  float* out = a.part + static_cast<int64_t>(s) * a.M * a.R;
  const int c_n = dmin(BN, a.R - c0);
  for (int e = threadIdx.x; e < nrows * c_n; e += blockDim.x) {
    const int o = e / c_n;
    const int cc = e % c_n;
    out[static_cast<int64_t>(rows[o]) * a.R + c0 + cc] = (cc < c_ok && n_steps > 0) ? Cs[o * LDC + cc] : 0.f;
  }
}

// Expand, block (tile, d group): for each 64-column block d0 of the group,
//   out[rows, d0:d0+64] = s_l * S[rows, :r] @ V_l[:r, d0:d0+64]
// with S the sum of the shrink's split partials rounded to T for the tensor cores (what a bf16
// matmul chain does too). A block walks several column blocks (strided by gridDim.y) so that the
// tile lookup and the row gather are paid once per block, not once per 64 columns.
// V_C: V_l(c, d) has c contiguous (B [N, R]); else d contiguous (A [R, K]).
//
// Why the first version ran at 13-17% of HBM bandwidth (T = 4096 over 128 adapters, r = 16,
// N = 4096: a block walks ~11 column blocks): for every column block it rebuilt the 64 x 32 S
// tile from `split` fp32 partials in global memory (6 K scalar loads at split 3, their latency
// exposed behind a __syncthreads), then loaded the 2 KB B tile synchronously, so per column block
// the SM waited for two round trips before writing its 8 KB of y. Now the S tile is built once per
// block (r <= 64 for 16-bit types, <= 32 for fp32: it stays in shared memory, 9 KB) and the B tile
// of the next column block is fetched by cp.async while this one multiplies and writes y; what is
// left per column block is the y stores, which do not wait.
template <typename T, bool V_C>
__global__ void __launch_bounds__(kTileThreads) sgmv_expand_kernel(SgmvExpandArgs a, bool vec_v, bool vec_o) {
  using Mma = TileMma<T, true, V_C>;
  using Lay = SmemTiles<T, true, V_C>;
  constexpr int kSCache = sizeof(T) == 2 ? 64 : BK;  // rank columns of S kept for the whole block
  constexpr int LDS = kSCache + 8;                   // 16-byte rows, 32-byte aligned fragments
  __shared__ __align__(128) T Ss[BM * LDS];
  __shared__ __align__(128) T Bs[2 * Lay::B_ELEMS];  // double buffer: next step's tile in flight
  __shared__ __align__(128) float Cs[BM * LDC];
  __shared__ int rows[BM];

  Tile t;
  if (!find_tile(blockIdx.x, a.seg, a.L, t)) return;
  const int g = t.g;
  const int r = g < a.L ? rank_of(a.ranks, g, a.R) : 0;
  const int nrows = static_cast<int>(t.end - t.begin);
  for (int e = threadIdx.x; e < BM; e += blockDim.x) rows[e] = e < nrows ? static_cast<int>(a.seg.perm[t.begin + e]) : 0;
  __syncthreads();
  auto s_value = [&](int o, int c) {  // S[rows[o], c], o < nrows, c < r
    float v = 0.f;
    for (int p = 0; p < a.split; ++p) v += a.part[(static_cast<int64_t>(p) * a.M + rows[o]) * a.R + c];
    return v;
  };

  if (a.s_out != nullptr && blockIdx.y == 0) {  // S for backward, one writer per row
    for (int e = threadIdx.x; e < nrows * a.R; e += blockDim.x) {
      const int o = e / a.R;
      const int c = e % a.R;
      a.s_out[static_cast<int64_t>(rows[o]) * a.R + c] = c < r ? s_value(o, c) : 0.f;
    }
  }

  T* out = static_cast<T*>(a.out);
  constexpr int V = vec_elems<T>();
  constexpr int VPR = BN / V;
  const int64_t n_dblocks = (a.D + BN - 1) / BN;
  // Column blocks of this block: blockIdx.y, blockIdx.y + gridDim.y, ... (gridDim.y <= n_dblocks)
  const int64_t my_blocks = (n_dblocks - blockIdx.y + gridDim.y - 1) / gridDim.y;
  auto write_out = [&](int64_t d0, bool zero, float scale) {
    const int d_n = static_cast<int>(dmin<int64_t>(BN, a.D - d0));
    for (int e = threadIdx.x; e < nrows * VPR; e += blockDim.x) {
      const int o = e / VPR;
      const int dd = (e % VPR) * V;
      T* dst = out + static_cast<int64_t>(rows[o]) * a.stride_om + d0 + dd;
      T vals[V];
#pragma unroll
      for (int u = 0; u < V; ++u) vals[u] = from_f<T>(zero ? 0.f : scale * Cs[o * LDC + dd + u]);
      if (vec_o && dd + V <= d_n) {
        uint4 raw;
        memcpy(&raw, vals, sizeof(raw));
        st16(dst, raw);
      } else {
        for (int u = 0; u < V && dd + u < d_n; ++u) dst[u] = vals[u];
      }
    }
  };
  if (r == 0) {  // rows without adapter (or rank 0): zeros (block-uniform branch)
    for (int64_t j = 0; j < my_blocks; ++j) write_out((blockIdx.y + j * gridDim.y) * BN, true, 0.f);
    return;
  }

  const float scale = a.scales[g];
  const T* Vl = static_cast<const T*>(a.V) + static_cast<int64_t>(g) * a.R * a.D;
  const bool cached = r <= kSCache;  // block-uniform
  if (cached) {  // the whole S tile, zero past the rank up to the last 32-column chunk the mma reads
    const int cw = (r + BK - 1) / BK * BK;
    for (int e = threadIdx.x; e < BM * cw; e += blockDim.x) {
      const int o = e / cw;
      const int c = e % cw;
      Ss[o * LDS + c] = from_f<T>(o < nrows && c < r ? s_value(o, c) : 0.f);
    }
  }
  // Steps: (column block j, rank chunk c) in that order; one B tile each.
  const int n_chunks = (r + BK - 1) / BK;
  const int64_t n_steps = my_blocks * n_chunks;
  auto issue = [&](int64_t k) {
    if (k < n_steps) {
      const int64_t d0 = (blockIdx.y + (k / n_chunks) * gridDim.y) * BN;
      const int c0 = static_cast<int>(k % n_chunks) * BK;
      const int d_n = static_cast<int>(dmin<int64_t>(BN, a.D - d0));
      const int c_ok = dmin(BK, r - c0);
      T* B = Bs + (k & 1) * Lay::B_ELEMS;
      if constexpr (V_C) {
        load_tile_async<T, BN, BK>(B, Lay::LDB, [&](int o) { return Vl + (d0 + o) * a.R + c0; }, d_n, c_ok, vec_v);
      } else {
        load_tile_async<T, BK, BN>(B, Lay::LDB, [&](int o) { return Vl + static_cast<int64_t>(c0 + o) * a.D + d0; },
                                   c_ok, d_n, vec_v);
      }
    }
    cp_async_commit();
  };
  issue(0);
  Mma mma;
#pragma unroll 1
  for (int64_t k = 0; k < n_steps; ++k) {
    const int64_t d0 = (blockIdx.y + (k / n_chunks) * gridDim.y) * BN;
    const int c0 = static_cast<int>(k % n_chunks) * BK;
    cp_async_wait<0>();
    __syncthreads();  // step k's B tile is in; every thread is done with step k - 1 (its slot, Ss, Cs)
    issue(k + 1);
    if (!cached) {  // r > kSCache: this chunk of S, rebuilt per column block
      for (int e = threadIdx.x; e < BM * BK; e += blockDim.x) {
        const int o = e / BK;
        const int cc = e % BK;
        Ss[o * LDS + cc] = from_f<T>(o < nrows && c0 + cc < r ? s_value(o, c0 + cc) : 0.f);
      }
      __syncthreads();
    }
    if (c0 == 0) mma.zero();
    mma.step(cached ? Ss + c0 : Ss, Bs + (k & 1) * Lay::B_ELEMS, LDS);
    if (c0 + BK >= r) {  // the column block's last rank chunk: write it out
      mma.store(Cs);
      __syncthreads();
      write_out(d0, false, scale);
    }
  }
  cp_async_wait<0>();
}

// Per-adapter reduction, block (q block, p block, adapter * split + run):
//   out[g, p-block, q-block] = s_g * sum over the run's rows of U[rows, p-block].T @ V[rows, q-block]
// Rows come 32 at a time in sorted order, which the stable sort makes the original row order: the
// sum is the same bit for bit on every run (no atomics). Blocks past an adapter's rank, and
// adapters without rows, write zeros. U and V are both in T (the glue rounds the fp32 G and S to T
// first, as a 16-bit matmul chain would), so both tiles stream through the cp.async ring that the
// shrink uses: steps s + 1 and s + 2 load while step s multiplies. The synchronous version (one 32-row
// step in flight per block) ran at ~15% of HBM bandwidth in a training step.
template <typename T>
__global__ void __launch_bounds__(kTileThreads) seg_outer_kernel(SegOuterArgs a, bool vec_u, bool vec_v) {
  using Mma = TileMma<T, false, false>;
  using Lay = SmemTiles<T, false, false>;
  constexpr int kStages = ShrinkSmem<T>::kStages;
  constexpr int kStageElems = Lay::A_ELEMS + Lay::B_ELEMS;  // multiples of 64 elements: 128-byte aligned stages
  constexpr int kRingBytes = kStages * kStageElems * static_cast<int>(sizeof(T));
  constexpr int kBytes = kRingBytes > BM * LDC * 4 ? kRingBytes : BM * LDC * 4;
  __shared__ __align__(128) unsigned char smem[kBytes];
  T* ring = reinterpret_cast<T*>(smem);
  float* Cs = reinterpret_cast<float*>(smem);  // after the ring is drained

  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int g = blockIdx.z / a.split;
  const int run = blockIdx.z % a.split;
  const int r = rank_of(a.ranks, g, a.R);
  const int64_t p_lim = a.rank_on_p ? dmin<int64_t>(a.P, r) : a.P;
  const int64_t q_lim = a.rank_on_p ? a.Q : dmin<int64_t>(a.Q, r);
  const int p_ok = static_cast<int>(dmax<int64_t>(0, dmin<int64_t>(BM, p_lim - p0)));
  const int q_ok = static_cast<int>(dmax<int64_t>(0, dmin<int64_t>(BN, q_lim - q0)));
  const int64_t seg_b = a.seg.seg_start[g];
  const int64_t seg_e = a.seg.seg_start[g + 1];
  const int64_t chunk = ((seg_e - seg_b + a.split - 1) / a.split + BK - 1) / BK * BK;
  const int64_t rb = seg_b + run * chunk;
  const int64_t re = dmin(seg_e, rb + chunk);
  const bool any = p_ok > 0 && q_ok > 0 && rb < re;  // block-uniform

  if (any) {
    const T* U = static_cast<const T*>(a.U);
    const T* Vm = static_cast<const T*>(a.V);
    const int64_t* perm = a.seg.perm;
    const int n_steps = static_cast<int>((re - rb + BK - 1) / BK);
    auto issue = [&](int step) {  // loads of one step into its ring slot, as one cp.async group
      if (step < n_steps) {
        T* As = ring + (step % kStages) * kStageElems;
        T* Bs = As + Lay::A_ELEMS;
        const int64_t i0 = rb + static_cast<int64_t>(step) * BK;
        const int i_ok = static_cast<int>(dmin<int64_t>(BK, re - i0));
        load_tile_async<T, BK, BM>(As, Lay::LDA, [&](int o) { return U + perm[i0 + o] * a.stride_um + p0; }, i_ok,
                                   p_ok, vec_u);
        load_tile_async<T, BK, BN>(Bs, Lay::LDB, [&](int o) { return Vm + perm[i0 + o] * a.stride_vm + q0; }, i_ok,
                                   q_ok, vec_v);
      }
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
    ring_mma<T, kStages, kStageElems, Lay::A_ELEMS, Mma>(ring, n_steps, issue, Cs);
  }
  __syncthreads();

  const float scale = a.scales[g];
  const int p_n = static_cast<int>(dmin<int64_t>(BM, a.P - p0));
  const int q_n = static_cast<int>(dmin<int64_t>(BN, a.Q - q0));
  T* out = static_cast<T*>(a.out);
  for (int e = threadIdx.x; e < p_n * q_n; e += blockDim.x) {
    const int pp = e / q_n;
    const int qq = e % q_n;
    const float v = (any && pp < p_ok && qq < q_ok) ? scale * Cs[pp * LDC + qq] : 0.f;
    const int64_t off = (static_cast<int64_t>(g) * a.P + p0 + pp) * a.Q + q0 + qq;
    if (a.split > 1) {
      a.ws[static_cast<int64_t>(run) * a.L * a.P * a.Q + off] = v;
    } else {
      out[off] = from_f<T>(v);
    }
  }
}

// =============================================================================================
// segment regime, register kernels (forward; 16-bit types, r_max <= 64)
// =============================================================================================
// Why: at decode batch sizes a segment holds a few rows (1024 rows over 128 adapters: 8), and the
// tile kernels above pad every tile to 64 rows: per 32-column step a block zero-fills ~3.5 K
// shared-memory elements and runs 64 x 64 wmma tiles for 8 x 16 useful outputs, so they ran at
// 0.140 ms on T1024 L128 r16 (48 MB to move: 12% of HBM bandwidth). Here a warp loads its tensor-core
// operands straight from global memory into registers, 16 bytes per lane, and feeds mma.sync
// m16n8k16 directly; rows past the segment are predicated off, not loaded.
//
// The trick that makes 16-byte loads legal: the MMA sums over k, so any permutation of k applied to
// both operands gives the same product. Lane (g, t) = (lane / 4, lane % 4) loads 8 consecutive
// elements at column 8 t of a 32-column step and feeds them as the operand pairs of logical columns
// {2t, 2t + 1, 2t + 8, 2t + 9} of two k16 MMAs; the other operand is loaded the same way. In the
// expand the same freedom over the output columns n lets each lane end with 8 consecutive outputs
// of its rows (one 16-byte store per row) instead of 2 scattered pairs per n-tile.
constexpr int kRowsThreads = 128;
constexpr int kRowsWarps = kRowsThreads / 32;

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  T e[2];
  memcpy(e, &u, sizeof(u));
  return make_float2(to_f(e[0]), to_f(e[1]));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T e[2] = {from_f<T>(lo), from_f<T>(hi)};
  uint32_t u;
  memcpy(&u, e, sizeof(u));
  return u;
}

// d[16 x 8] += a[16 x 16] @ b[16 x 8], fp32 accumulators (PTX mma.sync.m16n8k16). Lane 4 g + t holds
//   a = {A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9]}
//   b = {B[2t, 2t+1][g], B[2t+8, 2t+9][g]},   d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}
// (pairs packed low element first). Without the instruction (the CPU emulation) each lane gathers
// the operands it needs from the others by shuffles: the same product, in fp32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int q = 0; q < 4; ++q) {  // logical columns 2q, 2q+1, 2q+8, 2q+9 sit in the lanes with t = q
    uint32_t ar[4], b0[2], b1[2];
    for (int i = 0; i < 4; ++i) ar[i] = __shfl_sync(0xffffffffu, a[i], 4 * g + q);
    for (int i = 0; i < 2; ++i) b0[i] = __shfl_sync(0xffffffffu, b[i], 4 * (2 * t) + q);
    for (int i = 0; i < 2; ++i) b1[i] = __shfl_sync(0xffffffffu, b[i], 4 * (2 * t + 1) + q);
    auto dot = [](uint32_t u, uint32_t v) {
      const float2 x = unpack2<T>(u), y = unpack2<T>(v);
      return x.x * y.x + x.y * y.y;
    };
    acc[0] += dot(ar[0], b0[0]) + dot(ar[2], b0[1]);
    acc[1] += dot(ar[0], b1[0]) + dot(ar[2], b1[1]);
    acc[2] += dot(ar[1], b0[0]) + dot(ar[3], b0[1]);
    acc[3] += dot(ar[1], b1[0]) + dot(ar[3], b1[1]);
  }
  for (int i = 0; i < 4; ++i) d[i] += acc[i];
#endif
}

// Shrink, block (tile, split): part[s, rows, :] = x[rows, d-range] @ A_l[:, d-range].T for the tile's
// rows (<= 64), RG row groups of 16 per pass over d (more rows: another pass, A_l again from L2).
// Warp w takes the 32-column steps w, w + 4, ... of the block's d-range, U at a time with all their
// loads issued before the MMAs; the 4 warps' partial sums meet in shared memory. Per step a lane
// loads 16 bytes of each of its 2 RG rows and of NT rows of A_l: rank rows past r are not loaded
// (zeros), so values past an adapter's rank never reach the sums. A's loads come first in each
// step: they do not wait for the row numbers (perm), which each lane reads itself.
//
// L2 prefetch while the sort runs (pf_idx set: the glue sorted the rows in this call, with
// programmatic dependent launch). The sort is one short launch of mostly fixed latency (~3-5 us on
// an H100) during which DRAM idles, and the shrink cannot start its loads before the
// sort's tables say which rows and adapter each block takes. What it will read is known from the
// raw indices, though: x's rows and the used adapters' A. So each block, before its wait, hands a
// share of those bytes to the bulk-copy unit as L2 prefetches, and the loads after the wait hit L2.
// Safe to issue early: the sort was launched serially (everything before it is complete), and a
// prefetch only reads, inside x and A (indices outside [0, L) are skipped).
//   work units: [0, M) = x's rows (one prefetch each), then L x (chunks of A_l of kPrefetchChunk
//   bytes), skipped where no row uses adapter l; unit u goes to the grid's threads u, u + threads,
//   ... Only blocks holding adapter units scan the indices for the used flags.
// Measured (H100, bf16, K = N = 4096, graph replay): T1024 L128 r16 34.7 -> 33.5 us, T2048 L8 zipf
// 44.6 -> 42.4 us; prefetching B as well (for the expand) was 0.5 us slower at T1024.
constexpr int64_t kPrefetchChunk = 4096;

template <typename T>
__device__ void rows_prefetch(const SgmvShrinkArgs& a, IntVec idx) {
  __shared__ unsigned char used[kPrefetchMaxAdapters];
  const int64_t threads = static_cast<int64_t>(gridDim.x) * gridDim.y * blockDim.x;
  const int64_t first = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x;
  const int64_t gt = first + threadIdx.x;
  const int L = a.L;
  const int64_t x_bytes = a.D * static_cast<int64_t>(sizeof(T));  // a row of x
  const int64_t a_bytes = static_cast<int64_t>(a.R) * x_bytes;    // A_l: [R, K]
  const int64_t ca = (a_bytes + kPrefetchChunk - 1) / kPrefetchChunk;
  const int64_t units = a.M + static_cast<int64_t>(L) * ca;
  if (first >= units) return;  // the whole block: uniform, no barrier skipped by part of it
  const char* X = static_cast<const char*>(a.P);
  for (int64_t u = gt; u < a.M; u += threads)
    if (adapter_of(idx, u, L) >= 0) prefetch_l2(X + u * a.stride_pm * static_cast<int64_t>(sizeof(T)), x_bytes);
  // the block holds adapter units if some u = gt + j * threads lands in [M, units)
  bool any = false;
  for (int64_t u0 = first; u0 < units && !any; u0 += threads) any = u0 + blockDim.x > a.M;
  if (!any) return;
  for (int g = threadIdx.x; g < L; g += blockDim.x) used[g] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.M; i += blockDim.x) {
    const int g = adapter_of(idx, i, L);
    if (g >= 0) used[g] = 1;  // racing stores of the same value
  }
  __syncthreads();
  const char* A = static_cast<const char*>(a.W);
  const int64_t u0 = gt >= a.M ? gt : gt + (a.M - gt + threads - 1) / threads * threads;  // first u >= M
  for (int64_t u = u0; u < units; u += threads) {
    const int g = static_cast<int>((u - a.M) / ca);
    if (!used[g]) continue;
    const int64_t off = (u - a.M) % ca * kPrefetchChunk;
    prefetch_l2(A + g * a_bytes + off, dmin(kPrefetchChunk, a_bytes - off));
  }
}

// The rows a register-kernel block works on, as original row numbers in sorted order (-1 past
// nrows) in shared memory, and their group; false (block-uniform) when the block has none.
//   sorted mode (direct.ptr == nullptr): tile slot `slot` of the sort's tables;
//   direct mode (see rows_direct_ok in the header): no sort at all. Slots [0, L] are the groups
//   themselves, slot g taking the first kTileRows rows i with key(idx[i]) = g in row order (what
//   the stable sort puts first); slot L + 1 + k takes the k-th tile past its group's first, in
//   the sort's tile order (group, then position), which its block finds from a histogram of the
//   keys. Each block reads all M <= kDirectMaxRows indices once (kDirectPer consecutive rows per
//   thread, one round trip) and ranks its group's rows by a block scan. At most M / kTileRows
//   tiles lie past their group's first, so few slots have the histogram (4 at 256 rows, beside
//   33 group slots at L = 32).
// Why direct mode: a call that sorts spent ~4-5 us (H100, T256-T1024) in the one-block sort before
// any register-kernel block knew its rows, though at decode batch sizes no group has more than
// kTileRows rows. (Letting the group slots start during the sort and the others wait for it left
// the sort on the critical path: T256 L32 10.6 us, against 9.1-9.3 without a sort.) Why only up to
// 1024 rows: every block reads all the indices, so the L2 traffic grows as blocks x M; at 4096 rows
// (~1000 blocks, 32 KB each) direct mode measured 60-82 us against 59-62 with the sort, and 57-97
// against 48-58 where groups overflow (identical, skewed).
struct BlockRows {
  int rows[kTileRows];
  int wsum[kRowsWarps];
  int count[kDirectMaxGroups];  // overflow slots: rows per group
  int pick[2];                  // overflow slots: the group and the tile within it
};

// Block-wide exclusive scan of one int per thread (kRowsThreads threads); *total gets the sum.
// Ends with a barrier, so wsum may be reused by the next call.
__device__ __forceinline__ int block_excl_scan(int v, int* wsum, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int incl = warp_incl_sum(v);
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  int pos = incl - v, sum = 0;
#pragma unroll
  for (int w = 0; w < kRowsWarps; ++w) {
    const int u = wsum[w];
    pos += w < warp ? u : 0;
    sum += u;
  }
  __syncthreads();
  *total = sum;
  return pos;
}

// Direct mode: the keys (the adapter, L for none; -1 past M) of this thread's rows row0 + j,
// j < kDirectPer, consecutive so that a scan over threads ranks rows in row order.
constexpr int kDirectPer = static_cast<int>(kDirectMaxRows / kRowsThreads);
__device__ __forceinline__ int64_t direct_keys(IntVec idx, int64_t M, int L, int (&key)[kDirectPer]) {
  const int per = static_cast<int>((M + kRowsThreads - 1) / kRowsThreads);
  const int64_t row0 = static_cast<int64_t>(threadIdx.x) * per;
#pragma unroll
  for (int j = 0; j < kDirectPer; ++j) {
    key[j] = -1;
    if (j < per && row0 + j < M) {
      const int a = adapter_of(idx, row0 + j, L);
      key[j] = a < 0 ? L : a;
    }
  }
  return row0;
}

// Direct mode: the rows of group g at ranks [base, base + kTileRows) among the group's rows in row
// order, into br.rows (already -1). Returns how many.
__device__ int direct_rows(const int (&key)[kDirectPer], int64_t row0, int g, int base, BlockRows& br) {
  uint32_t match = 0;
#pragma unroll
  for (int j = 0; j < kDirectPer; ++j) match |= static_cast<uint32_t>(key[j] == g) << j;
  int total = 0;
  int pos = block_excl_scan(__popc(match), br.wsum, &total);
  while (match != 0) {
    const int j = __ffs(match) - 1;
    match &= match - 1;
    if (pos >= base && pos < base + kTileRows) br.rows[pos - base] = static_cast<int>(row0 + j);
    ++pos;
  }
  __syncthreads();  // the rows are visible to the block
  return dmax(0, dmin(total - base, kTileRows));
}

// Direct mode: the k-th tile past its group's first, counting groups in order and tiles within a
// group by position (the sort's tile order): g and the tile's first rank base. false (block-
// uniform) when fewer such tiles exist. A histogram of the keys in shared memory (consecutive rows
// of a thread with one key add once: prefill batches give long runs), then a block scan of the
// tiles past the first, floor((rows - 1) / kTileRows) per group.
__device__ bool overflow_tile(const int (&key)[kDirectPer], int L, int64_t k, BlockRows& br, int& g, int& base) {
  constexpr int kBins = kDirectMaxGroups / kRowsThreads;  // groups per thread in the scan
  static_assert(kDirectMaxGroups % kRowsThreads == 0, "whole bins per thread");
  for (int b = threadIdx.x; b < kDirectMaxGroups; b += kRowsThreads) br.count[b] = 0;
  __syncthreads();
  int run_key = -1, run = 0;
#pragma unroll
  for (int j = 0; j < kDirectPer; ++j) {
    if (key[j] != run_key) {
      if (run > 0) atomicAdd(&br.count[run_key], run);
      run_key = key[j];
      run = 0;
    }
    run += key[j] >= 0 ? 1 : 0;
  }
  if (run > 0) atomicAdd(&br.count[run_key], run);
  __syncthreads();
  int extra[kBins], mine = 0;
#pragma unroll
  for (int b = 0; b < kBins; ++b) {
    const int grp = threadIdx.x * kBins + b;
    const int c = grp <= L ? br.count[grp] : 0;
    extra[b] = c > 0 ? (c - 1) / kTileRows : 0;
    mine += extra[b];
  }
  int total = 0;
  int e = block_excl_scan(mine, br.wsum, &total);
  if (k >= total) return false;  // block-uniform
#pragma unroll
  for (int b = 0; b < kBins; ++b) {
    if (k >= e && k < e + extra[b]) {
      br.pick[0] = threadIdx.x * kBins + b;
      br.pick[1] = static_cast<int>(k - e + 1) * kTileRows;
    }
    e += extra[b];
  }
  __syncthreads();
  g = br.pick[0];
  base = br.pick[1];
  return true;
}

__device__ bool block_rows(int64_t slot, const Segments& seg, IntVec direct, int64_t M, int L, BlockRows& br, int& g,
                           int& nrows) {
  for (int o = threadIdx.x; o < kTileRows; o += blockDim.x) br.rows[o] = -1;
  if (direct.ptr != nullptr) {
    int key[kDirectPer];
    const int64_t row0 = direct_keys(direct, M, L, key);
    int base = 0;
    if (slot <= L) {
      g = static_cast<int>(slot);
    } else if (!overflow_tile(key, L, slot - (L + 1), br, g, base)) {
      return false;  // block-uniform
    }
    nrows = direct_rows(key, row0, g, base, br);  // (its scan's barriers order the -1 fill before its writes)
    return nrows > 0;
  }
  Tile tl;
  if (!find_tile_warp(slot, seg, L, tl)) return false;  // block-uniform
  g = tl.g;
  nrows = static_cast<int>(tl.end - tl.begin);
  __syncthreads();  // the -1 fill before the writes below
  for (int o = threadIdx.x; o < nrows; o += blockDim.x) br.rows[o] = static_cast<int>(seg.perm[tl.begin + o]);
  __syncthreads();
  return true;
}

template <typename T, int NT, int RG, int U>
__global__ void __launch_bounds__(kRowsThreads) rows_shrink_kernel(SgmvShrinkArgs a, IntVec pf_idx) {
  constexpr int kRows = 16 * RG;
  constexpr int kCols = 8 * NT;  // >= R
  __shared__ float red[kRowsWarps][kRows][kCols + 1];

  __shared__ BlockRows br;

  if (pf_idx.ptr != nullptr) rows_prefetch<T>(a, pf_idx);  // sorted in this call: see rows_prefetch
  const bool direct = a.direct.ptr != nullptr;
  // Sorted mode: the segment tables come from the sort just before (an overlapped launch). Direct
  // mode: the launch is serial (rows_shrink), so x, A and the indices are complete; the expand reads
  // only those and its own inputs before its wait, so it may start at once either way.
  if (!direct) grid_dep_wait();
  grid_dep_launch_dependents();
  int grp = 0, nrows = 0;
  if (!block_rows(direct ? blockIdx.y : blockIdx.x, a.seg, a.direct, a.M, a.L, br, grp, nrows)) return;
  const int s = direct ? blockIdx.x : blockIdx.y;
  const int64_t d_begin = static_cast<int64_t>(s) * a.d_chunk;
  const int64_t d_end = dmin(a.D, d_begin + a.d_chunk);
  const int r = grp < a.L ? rank_of(a.ranks, grp, a.R) : 0;
  const int* rows = br.rows;  // the tile's original row numbers
  float* out = a.part + static_cast<int64_t>(s) * a.M * a.R;
  if (r == 0 || d_end <= d_begin) {
    for (int e = threadIdx.x; e < nrows * a.R; e += blockDim.x) out[static_cast<int64_t>(rows[e / a.R]) * a.R + e % a.R] = 0.f;
    return;
  }

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const T* X = static_cast<const T*>(a.P);
  const T* Al = static_cast<const T*>(a.W) + static_cast<int64_t>(grp) * a.R * a.D;
  const int64_t n_steps = (d_end - d_begin + 31) / 32;
  const T* arow[NT];  // this lane's rank rows of A_l, nullptr past the rank
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = nt * 8 + gq;
    arow[nt] = c < r ? Al + static_cast<int64_t>(c) * a.D + 8 * tq : nullptr;
  }

  for (int p0 = 0; p0 < nrows; p0 += kRows) {
    const T* xrow[RG][2];  // rows p0 + 16 rg + gq (+ 8), nullptr past the tile
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int o = p0 + 16 * rg + 8 * h + gq;
        xrow[rg][h] = o < nrows ? X + rows[o] * a.stride_pm + 8 * tq : nullptr;
      }
    float acc[RG][NT][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rg][nt][i] = 0.f;

#pragma unroll 1
    for (int64_t st = warp; st < n_steps; st += U * kRowsWarps) {
      uint4 xv[U][RG][2], av[U][NT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t step = st + u * kRowsWarps;
        const int64_t k = d_begin + step * 32;  // + 8 tq in the row pointers
        const bool ok = step < n_steps && k + 8 * tq < d_end;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) av[u][nt] = (ok && arow[nt] != nullptr) ? ld16(arow[nt] + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t step = st + u * kRowsWarps;
        const int64_t k = d_begin + step * 32;
        const bool ok = step < n_steps && k + 8 * tq < d_end;
#pragma unroll
        for (int rg = 0; rg < RG; ++rg)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            xv[u][rg][h] = (ok && xrow[rg][h] != nullptr) ? ld16(xrow[rg][h] + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
          // elements 0-3 of the lane's 8 feed one k16 MMA, elements 4-7 the other
          const uint32_t a0[4] = {xv[u][rg][0].x, xv[u][rg][1].x, xv[u][rg][0].y, xv[u][rg][1].y};
          const uint32_t a1[4] = {xv[u][rg][0].z, xv[u][rg][1].z, xv[u][rg][0].w, xv[u][rg][1].w};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint32_t b0[2] = {av[u][nt].x, av[u][nt].y};
            const uint32_t b1[2] = {av[u][nt].z, av[u][nt].w};
            mma_16816<T>(acc[rg][nt], a0, b0);
            mma_16816<T>(acc[rg][nt], a1, b1);
          }
        }
    }

    // D[row][col] of every warp into shared memory, then the 4 warps' sum per output
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][16 * rg + gq + 8 * (i >> 1)][8 * nt + 2 * tq + (i & 1)] = acc[rg][nt][i];
    __syncthreads();
    const int prow = dmin(kRows, nrows - p0);
    for (int e = threadIdx.x; e < prow * a.R; e += blockDim.x) {
      const int o = e / a.R;
      const int c = e % a.R;
      float v = 0.f;
      if (c < r) {
#pragma unroll
        for (int w = 0; w < kRowsWarps; ++w) v += red[w][o][c];
      }
      out[static_cast<int64_t>(rows[p0 + o]) * a.R + c] = v;
    }
    __syncthreads();  // red is reused by the next pass
  }
}

// Expand, block (tile, column chunk): out[rows, n] = s_l * S[rows, :r] @ B_l[n, :r].T for n in the
// chunk [c0, c0 + chunk). Transposed on the tensor cores: one m16n8k16 MMA computes 16 columns of y
// for 8 rows of the tile,
//   D[16 columns][8 rows] += B_l[16 columns][16 ranks] @ S[8 rows][16 ranks].T
// so that B_l, [N, R] with the rank contiguous, is the row-major a-operand as it lies in memory, S
// the col-major b-operand, and a tile of 8 rows (1024 rows over 128 adapters) fills the MMA.
// Phases:
//   1. before waiting for the shrink: each warp loads the B operands of its first 64-column unit
//      straight into registers (B does not depend on the shrink, so this overlaps its tail);
//   2. S of the tile's rows, the sum of the shrink's split partials rounded to T (what a 16-bit
//      matmul chain does), into shared memory with the tile's output row numbers;
//   3. warp w takes the units w, w + 4, ... of the chunk, the next unit's B loads in flight while it
//      multiplies the current one against each 8-row group of S, one 16-byte store per lane and row.
// Why: the previous expand (MMA rows = tile rows, B staged in shared memory) spent half of every
// MMA on the padding rows 8-15 of an 8-row tile and ~220 instructions per 32 x 8 outputs on
// swizzled shared-memory addressing, masks and row selection; with its loads and stores switched
// off it still took 11 us at T1024 L128 r16 (H100, ncu: issue-bound, 14 K active cycles per SM),
// and 18.6 us with them, for 25 MB.
// Operand mapping (lane (g, t) = (lane / 4, lane % 4); the MMA sums over k, so any permutation of
// the ranks applied to both operands gives the same product, see the shrink):
//   ranks: the 4 physical ranks kofs(ks, t) + 0..3 stand for logical k {2t, 2t + 1, 2t + 8, 2t + 9}
//          of k-step ks; with KS >= 2, k-steps 2p and 2p + 1 share one 16-byte piece per row
//          (physical ranks 32 p + 8 t + 0..7), else one 8-byte piece (4 t + 0..3);
//   columns: MMA j (0..3) of a 64-column unit maps its a-row g to column 8 g + 2 j and a-row g + 8 to
//          8 g + 2 j + 1, so lane (g, t) ends with columns 8 g .. 8 g + 7 of tile rows 2 t and
//          2 t + 1 of the 8-row group: two 16-byte stores. Its a-operands are the rows 8 g .. 8 g + 7
//          of the unit's B_l slice, 8 or 16 bytes each at its physical ranks: a warp's load
//          instruction reads 8 whole 32-byte sectors, every byte used.
template <int KS>
__host__ __device__ constexpr int rows_expand_pieces() { return KS == 1 ? 1 : KS / 2; }  // B pieces per row

template <int KS>
__device__ __forceinline__ int rows_kofs(int ks, int t) {  // first physical rank of k-step ks, lane t
  return KS == 1 ? 4 * t : 32 * (ks >> 1) + 8 * t + 4 * (ks & 1);
}

// The B operands of one 64-column unit: piece p of row 8 g + j (uint4; with KS == 1 only .x, .y).
template <int KS>
struct ExpandFrag {
  uint4 v[8][rows_expand_pieces<KS>()];
};

// keep[ks]: the part of k-step ks's 4 physical ranks below the adapter's rank r. B may hold
// anything past an adapter's rank, NaN included, so those elements are zeroed as they are loaded,
// not multiplied by S's zeros.
template <typename T, int KS>
__device__ __forceinline__ void rows_expand_load(ExpandFrag<KS>& f, const T* Bl, int64_t n0, int64_t col_end, int R,
                                                 const uint64_t (&keep)[KS], int gq, int tq) {
  constexpr int P = rows_expand_pieces<KS>();
  const bool col_ok = n0 + 8 * gq < col_end;  // N % 8 == 0: a lane's 8 columns are all in or all out
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const T* row = Bl + (n0 + 8 * gq + j) * R;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      if constexpr (KS == 1) {
        const bool ok = col_ok && 4 * tq < R;  // R % 8 == 0: a piece lies wholly below R or not
        const uint2 u = ok ? *reinterpret_cast<const uint2*>(row + 4 * tq) : make_uint2(0, 0);
        f.v[j][p] = make_uint4(u.x & static_cast<uint32_t>(keep[0]), u.y & static_cast<uint32_t>(keep[0] >> 32), 0, 0);
      } else {
        const int k = 32 * p + 8 * tq;
        const uint4 u = (col_ok && k < R) ? ld16(row + k) : make_uint4(0, 0, 0, 0);
        const uint64_t m0 = keep[2 * p], m1 = keep[2 * p + 1];
        f.v[j][p] = make_uint4(u.x & static_cast<uint32_t>(m0), u.y & static_cast<uint32_t>(m0 >> 32),
                               u.z & static_cast<uint32_t>(m1), u.w & static_cast<uint32_t>(m1 >> 32));
      }
    }
  }
}

template <typename T, int KS>
__global__ void __launch_bounds__(kRowsThreads) rows_expand_kernel(SgmvExpandArgs a, int chunk) {
  constexpr int LDS = 16 * KS + 4;  // S row pitch (elements): 8-byte aligned rows, banks spread
  __shared__ __align__(16) T Ss[kTileRows][LDS];
  __shared__ BlockRows br;

  // Before the wait below: the sort's tables (complete before the expand starts in sorted mode: the
  // shrink triggers this launch only after its own wait), the raw indices (direct mode: complete
  // before the serially launched shrink) and B; the shrink's partials only after it.
  const bool direct = a.direct.ptr != nullptr;
  const int64_t c0 = static_cast<int64_t>(direct ? blockIdx.x : blockIdx.y) * chunk;
  if (c0 >= a.D) return;
  int grp = 0, nrows = 0;
  if (!block_rows(direct ? blockIdx.y : blockIdx.x, a.seg, a.direct, a.M, a.L, br, grp, nrows)) return;
  const bool chunk0 = c0 == 0;  // writes s_out
  const int64_t col_end = dmin<int64_t>(a.D, c0 + chunk);
  const int n_units = static_cast<int>((col_end - c0 + 63) / 64);
  const int r = grp < a.L ? rank_of(a.ranks, grp, a.R) : 0;
  const int n_rg = (nrows + 7) / 8;
  const int* rows = br.rows;  // the tile's original row numbers, -1 past nrows
  T* out = static_cast<T*>(a.out);
  const float scale = r > 0 ? a.scales[grp] : 0.f;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const T* Bl = static_cast<const T*>(a.V) + static_cast<int64_t>(grp < a.L ? grp : 0) * a.D * a.R;

  uint64_t keep[KS];  // see rows_expand_load
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int n_ok = dmax(0, dmin(4, r - rows_kofs<KS>(ks, tq)));
    keep[ks] = n_ok >= 4 ? ~0ull : ((1ull << (16 * n_ok)) - 1);
  }

  // 1. the first unit's B operands (B is written before the shrink: safe before the wait)
  ExpandFrag<KS> cur;
  if (r > 0 && warp < n_units) rows_expand_load<T, KS>(cur, Bl, c0 + 64 * warp, col_end, a.R, keep, gq, tq);
  grid_dep_wait();  // the shrink's partials

  // 2. S of the tile's rows (zeros past the rank and past the tile; 8-row groups whole), and for
  // backward (s_out) in fp32, one writer per row. Item = 4 ranks of a row (a float4 per partial).
  // Where items are fewer than threads, G lanes share an item, each summing the partials p = its
  // lane in the group + G i, and a butterfly adds the G sums: at T256 L32 (split 16, 32 items) one
  // round trip of 4 loads per thread instead of 16 loads behind one thread's register reuse.
  const int items = n_rg * 8 * 4 * KS;
  int G = 1;
  while (G < 32 && 2 * G <= a.split && 2 * G * items <= kRowsThreads) G *= 2;  // block-uniform
  for (int e0 = 0; e0 < items * G; e0 += kRowsThreads) {  // G > 1: one pass, whole groups of lanes
    const int e = e0 + threadIdx.x;
    const int it = e / G, pg = e % G;
    const int o = it / (4 * KS);
    const int c = (it % (4 * KS)) * 4;
    const bool mine = e < items * G && o < nrows && c < a.R;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mine) {
      const float* src = a.part + static_cast<int64_t>(rows[o]) * a.R + c;
      const int64_t step = a.M * a.R;  // one split
      int p = pg;
      for (; p + 3 * G < a.split; p += 4 * G) {  // 4 loads in flight, added in split order
        float4 q[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) q[u] = *reinterpret_cast<const float4*>(src + (p + u * G) * step);
#pragma unroll
        for (int u = 0; u < 4; ++u) { v.x += q[u].x; v.y += q[u].y; v.z += q[u].z; v.w += q[u].w; }
      }
      for (; p < a.split; p += G) {
        const float4 q = *reinterpret_cast<const float4*>(src + p * step);
        v.x += q.x; v.y += q.y; v.z += q.z; v.w += q.w;
      }
    }
    for (int off = 1; off < G; off <<= 1) {  // every lane of the warp: G divides 32
      v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
      v.z += __shfl_xor_sync(0xffffffffu, v.z, off);
      v.w += __shfl_xor_sync(0xffffffffu, v.w, off);
    }
    if (e >= items * G || pg != 0) continue;
    if (c + 0 >= r) v.x = 0.f;
    if (c + 1 >= r) v.y = 0.f;
    if (c + 2 >= r) v.z = 0.f;
    if (c + 3 >= r) v.w = 0.f;
    if (mine && a.s_out != nullptr && chunk0) *reinterpret_cast<float4*>(a.s_out + static_cast<int64_t>(rows[o]) * a.R + c) = v;
    uint2 packed;
    packed.x = pack2<T>(v.x, v.y);
    packed.y = pack2<T>(v.z, v.w);
    *reinterpret_cast<uint2*>(&Ss[o][c]) = packed;
  }
  __syncthreads();
  if (r == 0) {  // no adapter (or rank 0): the LoRA term of these rows is 0
    for (int e = threadIdx.x; e < nrows * ((col_end - c0) / 8); e += blockDim.x) {
      const int o = e / static_cast<int>((col_end - c0) / 8);
      const int64_t n = c0 + 8 * (e % ((col_end - c0) / 8));
      st16(out + static_cast<int64_t>(rows[o]) * a.stride_om + n, make_uint4(0, 0, 0, 0));
    }
    return;
  }

  // 3. units of 64 columns
#pragma unroll 1
  for (int unit = warp; unit < n_units; unit += kRowsWarps) {  // warp-uniform
    // r16: the next unit's loads in flight while this one multiplies (16 registers); at larger ranks a
    // unit's operands take 32-64 registers and the block's other warps hide the latency instead
    constexpr bool kAhead = KS == 1;
    ExpandFrag<KS> nxt;
    const bool more = kAhead && unit + kRowsWarps < n_units;
    if (more) rows_expand_load<T, KS>(nxt, Bl, c0 + 64 * (unit + kRowsWarps), col_end, a.R, keep, gq, tq);
    if (!kAhead && unit != warp) rows_expand_load<T, KS>(cur, Bl, c0 + 64 * unit, col_end, a.R, keep, gq, tq);
    // a-operands: {row 8g + 2j: k lo, row 8g + 2j + 1: k lo, row 8g + 2j: k hi, row 8g + 2j + 1: k hi}
    uint32_t af[4][KS][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int p = KS == 1 ? 0 : ks >> 1;
        const bool hi = KS != 1 && (ks & 1);
        const uint4 e0 = cur.v[2 * j][p], e1 = cur.v[2 * j + 1][p];
        af[j][ks][0] = hi ? e0.z : e0.x;
        af[j][ks][1] = hi ? e1.z : e1.x;
        af[j][ks][2] = hi ? e0.w : e0.y;
        af[j][ks][3] = hi ? e1.w : e1.y;
      }
    const bool col_ok = c0 + 64 * unit + 8 * gq < col_end;
    const int64_t n8 = c0 + 64 * unit + 8 * gq;  // this lane's 8 output columns
#pragma unroll 1
    for (int rg = 0; rg < n_rg; ++rg) {  // block-uniform trip count
      uint32_t sf[KS][2];  // b-operands: S[row 8 rg + g] at the lane's physical ranks
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint2 u = *reinterpret_cast<const uint2*>(&Ss[8 * rg + gq][rows_kofs<KS>(ks, tq)]);
        sf[ks][0] = u.x;
        sf[ks][1] = u.y;
      }
      float acc[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) mma_16816<T>(acc[j], af[j][ks], sf[ks]);
      }
      // lane (g, t): acc[j][h] = column 8g + 2j, acc[j][2 + h] = column 8g + 2j + 1, of tile row 8 rg + 2t + h
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int orow = rows[8 * rg + 2 * tq + h];
        if (orow < 0 || !col_ok) continue;
        uint4 vals;
        vals.x = pack2<T>(scale * acc[0][h], scale * acc[0][2 + h]);
        vals.y = pack2<T>(scale * acc[1][h], scale * acc[1][2 + h]);
        vals.z = pack2<T>(scale * acc[2][h], scale * acc[2][2 + h]);
        vals.w = pack2<T>(scale * acc[3][h], scale * acc[3][2 + h]);
        st16(out + static_cast<int64_t>(orow) * a.stride_om + n8, vals);
      }
    }
    if (more) cur = nxt;
  }
}

// =============================================================================================
// backward: the per-adapter reductions as dense GEMMs
// =============================================================================================
// out[i, l R + j] = s_l U[i, j] in T where l is row i's adapter and j < r_l; 0 elsewhere (rows
// without adapter, other adapters' column blocks, past the rank). U [M, R] fp32 (G or S), out
// [M, L R]. With it dA = out(G).T @ x is [L R, K] = dA [L, R, K] and dB = dy.T @ out(S) is
// [N, L R], one cuBLAS GEMM each that reads x or dy once (see spread_rows_worth). One thread per
// 8 output elements (one 16-byte store for 16-bit T), which share one row, one 64-bit division
// and one index load wherever L R % 8 == 0; elsewhere an element past the row divides again.
template <typename T>
__global__ void spread_rows_kernel(const float* U, IntVec idx, IntVec ranks, const float* scales, T* out, int64_t M,
                                   int R, int L) {
  constexpr int E = 8;
  const int64_t LR = static_cast<int64_t>(L) * R;
  const int64_t n = M * LR;
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * E; e0 < n;
       e0 += static_cast<int64_t>(gridDim.x) * blockDim.x * E) {
    const int64_t i0 = e0 / LR;
    const int c0 = static_cast<int>(e0 - i0 * LR);
    const int g0 = adapter_of(idx, i0, L);
    T v[E];
#pragma unroll
    for (int u = 0; u < E; ++u) {
      float f = 0.f;
      if (e0 + u < n) {
        int64_t i = i0;
        int c = c0 + u, g = g0;
        if (c >= LR) {  // past row i0 (only where L R % 8 != 0)
          i = (e0 + u) / LR;
          c = static_cast<int>(e0 + u - i * LR);
          g = adapter_of(idx, i, L);
        }
        const int l = c / R, j = c % R;
        if (g == l && j < rank_of(ranks, l, R)) f = scales[l] * U[i * R + j];
      }
      v[u] = from_f<T>(f);
    }
    if constexpr (sizeof(T) == 2) {
      if (e0 + E <= n) {  // e0 % 8 == 0: 16-byte aligned in the 16-byte aligned out
        uint4 w;
        memcpy(&w, v, sizeof(w));
        st16(out + e0, w);
        continue;
      }
    }
    for (int u = 0; u < E && e0 + u < n; ++u) out[e0 + u] = v[u];
  }
}

// =============================================================================================
// host side
// =============================================================================================
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_ceil(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
int bgmv_shrink_split(int64_t M, int64_t K, int sm_count, int* k_chunk) {
  // ~4 blocks per SM keep enough 16-byte loads in flight; a single decode row (M = 1, K = 4096)
  // is cut into 16 chunks of 256 columns rather than streamed by one block.
  const int64_t want = 4LL * std::max(sm_count, 1);
  int64_t split = std::min<int64_t>(std::max<int64_t>(1, cdiv(want, std::max<int64_t>(M, 1))), cdiv(K, 256));
  int64_t chunk = cdiv(cdiv(K, split), 256) * 256;
  chunk = std::min<int64_t>(chunk, 8192);  // x chunk in shared memory as fp32: <= 32 KB
  *k_chunk = static_cast<int>(chunk);
  return static_cast<int>(cdiv(K, chunk));
}

cudaError_t bgmv_shrink(DType dtype, const BgmvShrinkArgs& a, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  const int V = 16 / elem_size(dtype);
  const bool vec = aligned16(a.x) && aligned16(a.A) && a.stride_xm % V == 0 && a.K % V == 0;
  const dim3 grid(static_cast<unsigned>(a.M), static_cast<unsigned>(a.split));
  const size_t smem = static_cast<size_t>(a.k_chunk) * sizeof(float);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bgmv_shrink_kernel<T><<<grid, kShrinkThreads, smem, stream>>>(a, vec);
  });
}

cudaError_t bgmv_expand(DType dtype, const BgmvExpandArgs& a, int sm_count, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  const int V = 16 / elem_size(dtype);
  const bool vec = aligned16(a.B) && a.R % V == 0;
  // G lanes per column cover the R / V vectors of a row of B (r = 16 bf16: 2 lanes, r = 256: 32)
  const int lanes_log2 = vec ? std::min(5, log2_ceil(a.R / V)) : 0;
  const int64_t per_pass = vec ? (kExpandThreads >> lanes_log2) : kExpandThreads;
  const int64_t want_per_row = cdiv(4LL * std::max(sm_count, 1), a.M);  // ~4 blocks per SM in all
  const int64_t n_per_block = std::max<int64_t>(per_pass, cdiv(cdiv(a.N, want_per_row), per_pass) * per_pass);
  const dim3 grid(static_cast<unsigned>(a.M), static_cast<unsigned>(cdiv(a.N, n_per_block)));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bgmv_expand_kernel<T><<<grid, kExpandThreads, 0, stream>>>(a, n_per_block, lanes_log2, vec);
  });
}

cudaError_t make_keys(IntVec idx, int64_t M, int L, int32_t* keys, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(cdiv(M, 256), 1024));
  make_keys_kernel<<<blocks, 256, 0, stream>>>(idx, M, L, keys);
  return cudaGetLastError();
}

cudaError_t build_segments(const int32_t* sorted_keys, int64_t M, int L, int32_t* seg_start, int32_t* tile_start,
                           cudaStream_t stream) {
  build_segments_kernel<<<1, kSegThreads, 0, stream>>>(sorted_keys, M, L, seg_start, tile_start);
  return cudaGetLastError();
}

int64_t max_tiles(int64_t M, int L) {
  // sum over groups of ceil(count / 64) <= M / 64 + (number of non-empty groups)
  return cdiv(M, kTileRows) + std::min<int64_t>(static_cast<int64_t>(L) + 1, M);
}

// LORA_KERNELS_MULTI_SORT=radix: the radix sort even where the counting sort applies (to compare
// them on the GPU; read per call, ~0.1 us).
static bool radix_sort_forced() {
  const char* v = std::getenv("LORA_KERNELS_MULTI_SORT");
  return v != nullptr && std::string(v) == "radix";
}

#ifndef LORA_KERNELS_EMU
// Thread-block clusters: an sm_90+ device, and count_sort_segments_kernel<true> compiled for sm_90+
// (built for an older architecture and JIT-compiled from its PTX, its cluster helpers would be the
// one-block fallbacks).
static bool clusters_available() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  static const int ptx = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, count_sort_segments_kernel<true>) == cudaSuccess ? attr.ptxVersion : 0;
  }();
  return major >= 9 && ptx >= 90;
}
#endif

cudaError_t sort_segments(IntVec idx, int64_t M, int L, int64_t* perm, int32_t* seg_start, int32_t* tile_start,
                          cudaStream_t stream) {
  if (M > kSortMaxRows || L < 0) return cudaErrorInvalidValue;
  if (L + 1 <= kCountSortMaxGroups && !radix_sort_forced()) {
    const int blocks = static_cast<int>(std::max<int64_t>(1, cdiv(M, kCountSortThreads)));
    if (blocks == 1) {
      count_sort_segments_kernel<false><<<1, kCountSortThreads, 0, stream>>>(idx, M, L, perm, seg_start, tile_start);
      return cudaGetLastError();
    }
#ifndef LORA_KERNELS_EMU
    if (clusters_available()) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(blocks);
      cfg.blockDim = dim3(kCountSortThreads);
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = blocks;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      return cudaLaunchKernelEx(&cfg, count_sort_segments_kernel<true>, idx, M, L, perm, seg_start, tile_start);
    }
#endif
  }
  int end_bit = 1;
  while ((1LL << end_bit) <= static_cast<int64_t>(L) + 1) ++end_bit;  // bits of the padding key L + 1
  if (M <= kSortThreads * 2) {
    sort_segments_kernel<2><<<1, kSortThreads, 0, stream>>>(idx, M, L, end_bit, perm, seg_start, tile_start);
  } else if (M <= kSortThreads * 8) {
    sort_segments_kernel<8><<<1, kSortThreads, 0, stream>>>(idx, M, L, end_bit, perm, seg_start, tile_start);
  } else {
    sort_segments_kernel<16><<<1, kSortThreads, 0, stream>>>(idx, M, L, end_bit, perm, seg_start, tile_start);
  }
  return cudaGetLastError();
}

int sgmv_shrink_split(int64_t M, int L, int64_t D, int R, int sm_count, int64_t* d_chunk) {
  // Few tiles (decode-like batches, or one long segment) leave SMs idle: cut D, but keep >= 512
  // columns (16 steps of 32) per block so each block amortises its tile set-up and fills its
  // cp.async ring. ~6 blocks per SM (7 fit: 72 registers x 128 threads, 31 KB of shared memory),
  // each with two 5 KB steps in flight: ~60 KB per SM against the ~18 KB that HBM needs.
  // T = 4096 rows over 128 adapters (193 tile slots, 128 used), K = 4096: split 5 (832 columns),
  // 640 blocks, 4.8 per SM (was split 3, 2.9 per SM). The partials cost M x R x 4 x split bytes
  // written and read once (1.3 MB there, 1.4% of the 96 MB the op moves).
  const int64_t blocks = max_tiles(M, L) * cdiv(R, BN);
  const int64_t want = 6LL * std::max(sm_count, 1);
  int64_t split = std::min<int64_t>(std::max<int64_t>(1, cdiv(want, std::max<int64_t>(blocks, 1))),
                                    std::max<int64_t>(1, D / 512));
  *d_chunk = std::max<int64_t>(BK, cdiv(cdiv(D, split), BK) * BK);
  return static_cast<int>(std::max<int64_t>(1, cdiv(D, *d_chunk)));
}

cudaError_t sgmv_shrink(DType dtype, const SgmvShrinkArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.seg.n_tiles_max == 0) return cudaSuccess;
  const int V = 16 / elem_size(dtype);
  const bool vec_p = aligned16(a.P) && a.stride_pm % V == 0;
  const bool vec_w = aligned16(a.W) && (a.w_d_contiguous ? a.D % V == 0 : a.R % V == 0);
  const dim3 grid(static_cast<unsigned>(a.seg.n_tiles_max), static_cast<unsigned>(cdiv(a.R, BN)),
                  static_cast<unsigned>(a.split));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.w_d_contiguous) {
      sgmv_shrink_kernel<T, true><<<grid, kTileThreads, 0, stream>>>(a, vec_p, vec_w);
    } else {
      sgmv_shrink_kernel<T, false><<<grid, kTileThreads, 0, stream>>>(a, vec_p, vec_w);
    }
  });
}

cudaError_t sgmv_expand(DType dtype, const SgmvExpandArgs& a, int sm_count, cudaStream_t stream) {
  if (a.M == 0 || a.D == 0 || a.seg.n_tiles_max == 0) return cudaSuccess;
  const int V = 16 / elem_size(dtype);
  const bool vec_v = aligned16(a.V) && (a.v_c_contiguous ? a.R % V == 0 : a.D % V == 0);
  const bool vec_o = aligned16(a.out) && a.stride_om % V == 0;
  // Column groups: enough blocks for ~5 resident per SM (bf16: 96 registers x 128 threads -> 5,
  // 37 KB of shared memory -> 6), the rest of the 64-column blocks walked inside a block, which
  // builds its S tile once and prefetches the next B tile. T = 4096 rows over 128 adapters, N =
  // 4096: 193 tile slots (128 used) x 4 groups of 16 column blocks = 512 blocks, 3.9 per SM.
  const int64_t d_blocks = cdiv(a.D, BN);
  const int64_t groups = std::min<int64_t>(d_blocks, std::max<int64_t>(1, cdiv(5LL * std::max(sm_count, 1),
                                                                               a.seg.n_tiles_max)));
  const dim3 grid(static_cast<unsigned>(a.seg.n_tiles_max), static_cast<unsigned>(groups));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.v_c_contiguous) {
      sgmv_expand_kernel<T, true><<<grid, kTileThreads, 0, stream>>>(a, vec_v, vec_o);
    } else {
      sgmv_expand_kernel<T, false><<<grid, kTileThreads, 0, stream>>>(a, vec_v, vec_o);
    }
  });
}

bool rows_kernels_ok(DType dtype, const void* x, int64_t stride_xm, int64_t K, const void* A, const void* B, int R,
                     const void* y, int64_t stride_ym, int64_t N) {
  // 16-byte accesses of x, A, y; 8-byte accesses of B and float4 reads of S: every row aligned
  return dtype != DType::kFloat32 && R >= 1 && R <= 64 && R % 8 == 0 && K % 8 == 0 && N % 8 == 0 &&
         stride_xm % 8 == 0 && stride_ym % 8 == 0 && aligned16(x) && aligned16(A) && aligned16(B) && aligned16(y);
}

int rows_shrink_split(int64_t M, int L, int64_t D, int sm_count, int64_t* d_chunk, int blocks_per_sm) {
  // ~6 blocks per SM (4 warps each, 70-100 registers), each lane with U steps of 16-byte loads in
  // flight: 1024 rows over 128 adapters at r = 16, K = 4096: 145 tile slots (128 used), split 6 of
  // 768 columns. Columns per block stay a multiple of 128 (4 warps x 32) and >= 256 so that the
  // partials (M x R x 4 bytes per split) stay small next to x. A sweep of 4..24 blocks per SM
  // (benchmarks/sweep_multi_rows.py, H100) moved the forward by < 10%, within run-to-run noise.
  const int64_t tiles = std::max<int64_t>(1, max_tiles(M, L));
  const int64_t want = static_cast<int64_t>(blocks_per_sm > 0 ? blocks_per_sm : 6) * std::max(sm_count, 1);
  const int64_t split = std::min<int64_t>(std::max<int64_t>(1, cdiv(want, tiles)), std::max<int64_t>(1, D / 256));
  *d_chunk = std::max<int64_t>(128, cdiv(cdiv(D, split), 128) * 128);
  return static_cast<int>(std::max<int64_t>(1, cdiv(D, *d_chunk)));
}

// (defined below, beside pdl_enabled)
template <typename... KArgs, typename... Args>
cudaError_t launch_overlapped(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              bool overlap, Args... args);

// Template shapes: NT n-tiles of 8 ranks (shrink) or KS k-steps of 16 ranks (expand), RG row groups
// of 16 per shrink pass, U steps / units with their loads in flight at once; chosen so that the
// accumulators and in-flight operands stay under ~100 registers (5+ blocks of 128 threads per SM).
// The shrink takes one row group per pass where adapters average <= 16 rows (decode batches: 4
// steps of loads in flight instead of 2), two otherwise (A re-read from L2 once per 32 rows).
cudaError_t rows_shrink(DType dtype, const SgmvShrinkArgs& a, cudaStream_t stream, IntVec pf_idx) {
  if (a.M == 0 || a.seg.n_tiles_max == 0) return cudaSuccess;
  if (!a.w_d_contiguous || a.R > 64 || dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (a.direct.ptr != nullptr && (a.M > kDirectMaxRows || a.L + 1 > kDirectMaxGroups)) return cudaErrorInvalidValue;
  const dim3 grid = a.direct.ptr != nullptr
                        ? dim3(static_cast<unsigned>(a.split), static_cast<unsigned>(a.L + 1 + max_overflow_tiles(a.M)))
                        : dim3(static_cast<unsigned>(a.seg.n_tiles_max), static_cast<unsigned>(a.split));
  const bool short_segments = a.M <= 16LL * std::max(a.L, 1);
  // Direct mode has no sort before it: the launch is serial, since the blocks read x and the
  // indices at once (nothing to wait for in the kernel).
  const bool overlap = a.direct.ptr == nullptr;
  cudaError_t err = cudaSuccess;
  const cudaError_t e = with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      void (*kernel)(SgmvShrinkArgs, IntVec) = nullptr;
      if (a.R <= 8) {
        kernel = short_segments ? rows_shrink_kernel<T, 1, 1, 4> : rows_shrink_kernel<T, 1, 2, 2>;
      } else if (a.R <= 16) {
        kernel = short_segments ? rows_shrink_kernel<T, 2, 1, 4> : rows_shrink_kernel<T, 2, 2, 2>;
      } else if (a.R <= 32) {
        kernel = short_segments ? rows_shrink_kernel<T, 4, 1, 2> : rows_shrink_kernel<T, 4, 2, 1>;
      } else {
        kernel = rows_shrink_kernel<T, 8, 1, 1>;
      }
      err = launch_overlapped(kernel, grid, dim3(kRowsThreads), 0, stream, overlap, a, pf_idx);
    }
  });
  return err != cudaSuccess ? err : e;
}

// Launch with programmatic stream serialization where the GPU has it (sm_90+) unless
// LORA_KERNELS_MULTI_PDL=0: the kernel may start while the previous kernel of the stream finishes,
// its blocks waiting in grid_dep_wait (device side) for what that kernel writes. The segment
// forward is three short kernels (sort, shrink, expand) that each start with a few dependent
// round trips to memory; overlapping them hides those and the launch gaps between them.
bool pdl_enabled() {
#ifdef LORA_KERNELS_EMU
  return false;
#else
  static const bool env_on = [] {
    const char* v = std::getenv("LORA_KERNELS_MULTI_PDL");
    return v == nullptr || std::string(v) != "0";
  }();
  if (!env_on) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 9;
#endif
}

bool rows_direct_ok(int64_t M, int L) {
  // No sort kernel: every block reads all the indices itself, so the bound on M keeps that read
  // short next to the sort it replaces (see block_rows).
  // LORA_KERNELS_MULTI_DIRECT=0 (read per call) turns it off.
  const char* v = std::getenv("LORA_KERNELS_MULTI_DIRECT");
  if (v != nullptr && std::string(v) == "0") return false;
  return M >= 1 && M <= kDirectMaxRows && L >= 1 && L + 1 <= kDirectMaxGroups;
}

bool rows_prefetch_worth(int64_t bytes) {
  // Below ~16 MB the bytes of a call repeated on the same tensors stay in the H100's 50 MB L2 and
  // the prefetch only adds work before the wait (T256 L32 r16, 6 MB: 13.1 -> 13.8 us); above ~32 MB
  // it evicts what it brought before the shrink reads it (T4096 L128, 48 MB: no gain).
  // LORA_KERNELS_MULTI_PREFETCH_MB (read per call; 0 = off) moves the upper bound.
  if (!pdl_enabled()) return false;  // nothing would overlap it
  const char* v = std::getenv("LORA_KERNELS_MULTI_PREFETCH_MB");
  const int64_t hi = (v != nullptr ? std::max<int64_t>(0, std::atoll(v)) : 32) << 20;
  return bytes >= (int64_t{16} << 20) && bytes <= hi;
}

template <typename... KArgs, typename... Args>
cudaError_t launch_overlapped(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              bool overlap, Args... args) {
#ifndef LORA_KERNELS_EMU
  if (overlap && pdl_enabled()) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
  }
#endif
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}

int rows_expand_chunk(int64_t D, int64_t n_tiles, int sm_count, int blocks_per_sm, int R) {
  // Columns per block: ~8 blocks per SM in all up to r32 (1024 rows over 128 adapters at r16,
  // N = 4096: 145 tile slots x 7 chunks of 640 columns); past r32 ~4 per SM, the chunk count
  // rounded up; a multiple of 64 columns (one unit of a warp). The KS = 4 variant (r > 32, 121
  // registers) fits 4 blocks of 128 threads on an SM, the others 7 (72 registers): at 8 per SM its
  // blocks ran in up to ~1.6 waves. H100, graph, the call at K = N = 4096, r64, 22 cases of T 256 -
  // 4096 x L 8 - 128 (RESULTS.md): 0.80-0.99x of the time at 8 per SM in 17 of them (T1024 L64
  // distinct 48.6 -> 45.5 us, T4096 L8 108.8 -> 87.7), 1.03-1.04x in 3, 1.10x at T4096 L128 zipf;
  // rounded down instead, that one was 1.22x. r16 / r32 are best at 8 (T4096 L128 r16 55.5 us vs
  // 58.0 at 7; T1024 L64 r32 30.0 vs 32.2 at 4).
  const bool wide = R > 32;
  const int64_t want = static_cast<int64_t>(blocks_per_sm > 0 ? blocks_per_sm : (wide ? 4 : 8)) * std::max(sm_count, 1);
  const int64_t slots = std::max<int64_t>(1, n_tiles);
  const int64_t groups = std::max<int64_t>(1, wide ? cdiv(want, slots) : want / slots);
  return static_cast<int>(std::max<int64_t>(64, cdiv(cdiv(D, groups), 64) * 64));
}

cudaError_t rows_expand(DType dtype, const SgmvExpandArgs& a, int sm_count, cudaStream_t stream, int blocks_per_sm) {
  if (a.M == 0 || a.D == 0 || a.seg.n_tiles_max == 0) return cudaSuccess;
  if (!a.v_c_contiguous || a.R > 64 || a.R % 8 != 0 || a.D % 8 != 0 || a.stride_om % 8 != 0 ||
      dtype == DType::kFloat32)
    return cudaErrorInvalidValue;
  if (a.direct.ptr != nullptr && (a.M > kDirectMaxRows || a.L + 1 > kDirectMaxGroups)) return cudaErrorInvalidValue;
  const int chunk = rows_expand_chunk(a.D, a.seg.n_tiles_max, sm_count, blocks_per_sm, a.R);
  const unsigned chunks = static_cast<unsigned>(cdiv(a.D, chunk));
  const dim3 grid = a.direct.ptr != nullptr ? dim3(chunks, static_cast<unsigned>(a.L + 1 + max_overflow_tiles(a.M)))
                                            : dim3(static_cast<unsigned>(a.seg.n_tiles_max), chunks);
  cudaError_t err = cudaSuccess;
  const cudaError_t e = with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      if (a.R <= 16) {
        err = launch_overlapped(rows_expand_kernel<T, 1>, grid, dim3(kRowsThreads), 0, stream, true, a, chunk);
      } else if (a.R <= 32) {
        err = launch_overlapped(rows_expand_kernel<T, 2>, grid, dim3(kRowsThreads), 0, stream, true, a, chunk);
      } else {
        err = launch_overlapped(rows_expand_kernel<T, 4>, grid, dim3(kRowsThreads), 0, stream, true, a, chunk);
      }
    }
  });
  return err != cudaSuccess ? err : e;
}

int seg_outer_split(int64_t M, int L, int64_t P, int64_t Q, int sm_count) {
  // Each block streams its rows in synchronous 32-row steps (a 4 KB tile of x or dy in flight), so
  // the bandwidth comes from blocks in flight: aim at ~8 per SM (5-7 are resident, the rest queue)
  // by cutting each adapter's rows into runs of >= 128 rows, whose fp32 partials [runs, L, P, Q]
  // are summed afterwards. Measured in the patched 4-layer Llama (8 x 1024 tokens over 8 adapters,
  // r16, H100): at ~2 blocks per SM dA and dB took 6.5 ms per training step, 15% of HBM bandwidth.
  // The partials stay small next to the rows read: dA at K = 2048, L = 8 gives 256 blocks, split 5,
  // 5.2 MB of partials against 33 MB of x; dB at N = 512 (k_proj) 64 blocks, split 17, 4.5 MB
  // against 8 MB of dy.
  const int64_t blocks = std::max<int64_t>(1, cdiv(P, BM) * cdiv(Q, BN) * std::max(L, 1));
  const int64_t want = 8LL * std::max(sm_count, 1);
  const int64_t split = std::min<int64_t>({std::max<int64_t>(1, cdiv(want, blocks)), std::max<int64_t>(1, M / 128), 64});
  return static_cast<int>(split);
}

cudaError_t seg_outer(DType dtype, const SegOuterArgs& a, cudaStream_t stream) {
  if (a.L == 0 || a.P == 0 || a.Q == 0) return cudaSuccess;
  const int V = 16 / elem_size(dtype);
  const bool vec_u = aligned16(a.U) && a.stride_um % V == 0;
  const bool vec_v = aligned16(a.V) && a.stride_vm % V == 0;
  const dim3 grid(static_cast<unsigned>(cdiv(a.Q, BN)), static_cast<unsigned>(cdiv(a.P, BM)),
                  static_cast<unsigned>(a.L * a.split));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    seg_outer_kernel<T><<<grid, kTileThreads, 0, stream>>>(a, vec_u, vec_v);
  });
}

bool spread_rows_worth(int L, int R) {
  // The GEMM does L R multiply-adds per element of x (or dy) it reads: at L R <= 512 it stays near
  // the read's time on an H100 (8173 rows, K = N = 4096: L8 r16 dA 27 us + dB 30 us against 160 us
  // for the two segment-kernel reductions; L32 r16 43 + 49 us; x + dy take 45 us at 3 TB/s). Past
  // that its FLOPs grow with every adapter of the call while the segment kernel reads each row once.
  return static_cast<int64_t>(L) * R <= 512;
}

cudaError_t spread_rows(DType dtype, const float* U, IntVec idx, IntVec ranks, const float* scales, void* out,
                        int64_t M, int R, int L, cudaStream_t stream) {
  const int64_t n = M * L * static_cast<int64_t>(R);
  if (n == 0) return cudaSuccess;
  if (dtype != DType::kFloat32 && !aligned16(out)) return cudaErrorInvalidValue;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(cdiv(cdiv(n, 8), threads), 65535));
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    spread_rows_kernel<T><<<blocks, threads, 0, stream>>>(U, idx, ranks, scales, static_cast<T*>(out), M, R, L);
  });
}

}  // namespace lora_kernels
