// CPU emulation of the CUDA features that csrc/multi_lora_kernels.cu uses, so that its kernels and
// launchers run on a machine without a GPU (slowly): every CUDA thread of a block is an OS thread,
// blocks run one after another, __shared__ variables are statics (one block at a time), and
// __syncthreads / warp shuffles are barriers. wmma fragments hold the whole 16x16 tile in every
// lane. This checks indexing, masking, tiling, splits and layouts, not timing or the hardware's
// memory model; the GPU tests (-m gpu) run the real thing.
#pragma once
#define LORA_KERNELS_EMU 1  // csrc: serial launches, no programmatic dependent launch
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#include <cuda_runtime_api.h>
#include <vector_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <barrier>
#include <mutex>
#include <utility>
#include <thread>
#include <vector>
#include <functional>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#undef __align__
#define __align__(n) __attribute__((aligned(n)))

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::barrier<>*> g_warp_barriers;
inline float g_shfl[1024];
inline uint32_t g_shfl_u[1024];
inline std::vector<unsigned char> g_dyn_smem(48 * 1024);
inline cudaError_t g_err = cudaSuccess;
// L2 prefetches the kernels issued (address, bytes): checked by the tests against the tensors' ranges
inline std::mutex g_prefetch_mu;
inline std::vector<std::pair<const void*, int64_t>> g_prefetches;
inline void record_prefetch(const void* p, int64_t bytes) {
  std::lock_guard<std::mutex> lock(g_prefetch_mu);
  g_prefetches.emplace_back(p, bytes);
}
inline cudaError_t last_error() { auto e = g_err; g_err = cudaSuccess; return e; }
inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "misaligned 16-byte access at %p\n", p);
    std::abort();
  }
}

template <typename K, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, K kernel, Args... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024 || grid.y > 65535 || grid.z > 65535 || smem > 48 * 1024) {
    g_err = cudaErrorInvalidConfiguration;
    return;
  }
  // One OS thread per CUDA thread for the whole launch; blocks one after another, separated by a
  // barrier (the statics standing in for __shared__ belong to one block at a time).
  std::barrier<> bar(nt), done(nt);
  g_block_barrier = &bar;
  std::vector<std::barrier<>*> wb;
  for (unsigned w = 0; w < (nt + 31) / 32; ++w) wb.push_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
  g_warp_barriers = wb;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([=, &done] {
      threadIdx = make_uint3(t, 0, 0);
      blockDim = block;
      gridDim = grid;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            if (t == 0) std::memset(g_dyn_smem.data(), 0xCD, g_dyn_smem.size());  // garbage, like real shared memory
            done.arrive_and_wait();
            blockIdx = make_uint3(bx, by, bz);
            kernel(args...);
            done.arrive_and_wait();
          }
    });
  for (auto& t : ts) t.join();
  for (auto* b : wb) delete b;
}
}  // namespace emu

inline void __syncthreads() { emu::g_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  emu::g_shfl[t] = v;
  emu::g_warp_barriers[w]->arrive_and_wait();
  const float r = emu::g_shfl[w * 32 + (lane ^ off)];
  emu::g_warp_barriers[w]->arrive_and_wait();
  return r;
}

inline int __shfl_xor_sync(unsigned, int v, int off) {
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  emu::g_shfl_u[t] = static_cast<uint32_t>(v);
  emu::g_warp_barriers[w]->arrive_and_wait();
  const int r = static_cast<int>(emu::g_shfl_u[w * 32 + (lane ^ off)]);
  emu::g_warp_barriers[w]->arrive_and_wait();
  return r;
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu::g_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline uint32_t __shfl_sync(unsigned, uint32_t v, int src) {
  const unsigned t = threadIdx.x, w = t / 32;
  emu::g_shfl_u[t] = v;
  emu::g_warp_barriers[w]->arrive_and_wait();
  const uint32_t r = emu::g_shfl_u[w * 32 + (src & 31)];
  emu::g_warp_barriers[w]->arrive_and_wait();
  return r;
}

inline int __shfl_up_sync(unsigned, int v, int off) {  // lanes below off keep their own value
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  emu::g_shfl_u[t] = static_cast<uint32_t>(v);
  emu::g_warp_barriers[w]->arrive_and_wait();
  const int r = lane >= static_cast<unsigned>(off) ? static_cast<int>(emu::g_shfl_u[t - off]) : v;
  emu::g_warp_barriers[w]->arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, bool v) {
  const unsigned t = threadIdx.x, w = t / 32;
  emu::g_shfl_u[t] = v ? 1u : 0u;
  emu::g_warp_barriers[w]->arrive_and_wait();
  unsigned m = 0;
  for (unsigned l = 0; l < 32 && w * 32 + l < blockDim.x; ++l) m |= emu::g_shfl_u[w * 32 + l] << l;
  emu::g_warp_barriers[w]->arrive_and_wait();
  return m;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }  // shared or global

// wmma: every lane keeps the whole 16x16 fragment; loads and mma are computed by every lane (the
// same values), stores by every lane (the same values: benign).
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {};
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment { float v[16][16]; };
inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) { std::fprintf(stderr, "wmma load: pointer not 32-byte aligned\n"); std::abort(); }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j)
    f.v[i][j] = tof(std::is_same<Layout, row_major>::value ? p[i * ld + j] : p[i + j * ld]);
}
template <typename Layout>
void fill_fragment(fragment<accumulator, 16, 16, 16, float, Layout>& f, float x) {
  for (auto& r : f.v) for (auto& e : r) e = x;
}
template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.v[i][j];
    for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
    out.v[i][j] = s;
  }
  d = out;
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) { std::fprintf(stderr, "wmma store: pointer not 32-byte aligned\n"); std::abort(); }
  const unsigned lane = threadIdx.x % 32;
  if (lane != 0) return;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ld + j] : p[i + j * ld]) = f.v[i][j];
}
}}  // namespace nvcuda::wmma

namespace cub {
template <typename T, int NT>
struct BlockScan {
  struct TempStorage { T vals[NT]; };
  TempStorage& s;
  explicit BlockScan(TempStorage& st) : s(st) {}
  void ExclusiveSum(T in, T& out, T& total) {
    s.vals[threadIdx.x] = in;
    __syncthreads();
    T acc = 0, tot = 0;
    for (unsigned i = 0; i < NT; ++i) { if (i < threadIdx.x) acc += s.vals[i]; tot += s.vals[i]; }
    out = acc; total = tot;
    __syncthreads();
  }
};
// Blocked arrangement in and out (thread t holds items t * ITEMS ..); a stable sort on the bits
// [begin_bit, end_bit) of the keys, as cub's LSD radix sort is.
template <typename K, int NT, int ITEMS, typename V>
struct BlockRadixSort {
  struct TempStorage { K keys[NT * ITEMS]; V vals[NT * ITEMS]; };
  TempStorage& s;
  explicit BlockRadixSort(TempStorage& st) : s(st) {}
  void Sort(K (&keys)[ITEMS], V (&vals)[ITEMS], int begin_bit, int end_bit) {
    const unsigned t = threadIdx.x;
    for (int j = 0; j < ITEMS; ++j) { s.keys[t * ITEMS + j] = keys[j]; s.vals[t * ITEMS + j] = vals[j]; }
    __syncthreads();
    if (t == 0) {
      const unsigned long long mask = (1ull << (end_bit - begin_bit)) - 1;
      std::vector<int> order(NT * ITEMS);
      for (int i = 0; i < NT * ITEMS; ++i) order[i] = i;
      auto bits = [&](int i) { return (static_cast<unsigned long long>(s.keys[i]) >> begin_bit) & mask; };
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bits(a) < bits(b); });
      std::vector<K> k2(NT * ITEMS); std::vector<V> v2(NT * ITEMS);
      for (int i = 0; i < NT * ITEMS; ++i) { k2[i] = s.keys[order[i]]; v2[i] = s.vals[order[i]]; }
      for (int i = 0; i < NT * ITEMS; ++i) { s.keys[i] = k2[i]; s.vals[i] = v2[i]; }
    }
    __syncthreads();
    for (int j = 0; j < ITEMS; ++j) { keys[j] = s.keys[t * ITEMS + j]; vals[j] = s.vals[t * ITEMS + j]; }
    __syncthreads();
  }
};
}  // namespace cub
