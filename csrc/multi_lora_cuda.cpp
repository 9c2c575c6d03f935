// CUDA glue of the multi-adapter LoRA ops: allocate outputs, build the segments, launch the kernels
// of multi_lora_kernels.cu on the current stream. Inputs are checked in multi_lora.cpp. Nothing here
// reads a device value back to the host, so both ops can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>

#include "multi_lora_kernels.cuh"
#include "multi_lora_ops.h"

namespace lora_kernels {

using at::Tensor;

namespace {

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "multi_lora: unsupported dtype ", t.scalar_type());
  }
}

IntVec int_vec(const Tensor& t) { return IntVec{t.data_ptr(), t.scalar_type() == at::kLong}; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "multi_lora: launching ", what, " failed: ", cudaGetErrorString(err));
}

// A 2-D tensor whose rows may be strided but whose columns are contiguous (what the kernels read).
Tensor rows_contiguous(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

// Multiprocessors of a device, read once per device (c10 headers only: ATen/cuda/CUDAContext.h pulls
// in the cuBLAS / cuSPARSE headers). Cached so that no runtime query runs while a graph is captured.
int sm_count(int device) {
  static std::atomic<int> cache[128] = {};
  if (device < 0 || device >= 128) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Rows sorted by adapter with a stable sort, and the tile table over them (see build_segments).
struct SegmentTensors {
  Tensor perm, seg_start, tile_start;
  Segments view;

  SegmentTensors(Tensor p, Tensor s, Tensor t, int64_t M, int L)
      : perm(std::move(p)), seg_start(std::move(s)), tile_start(std::move(t)),
        view{perm.data_ptr<int64_t>(), seg_start.data_ptr<int32_t>(), tile_start.data_ptr<int32_t>(),
             max_tiles(M, L)} {}
  // No tables (direct mode): only the grid bound.
  SegmentTensors(int64_t M, int L) : view{nullptr, nullptr, nullptr, max_tiles(M, L)} {}
};

SegmentTensors make_segments(const Tensor& indices, int64_t M, int L, cudaStream_t stream) {
  const auto iopt = indices.options().dtype(at::kInt);
  if (M <= kSortMaxRows) {  // one launch: keys, sort and tile table (a block, or a cluster of blocks)
    SegmentTensors s(at::empty({M}, indices.options().dtype(at::kLong)), at::empty({L + 2}, iopt),
                     at::empty({L + 2}, iopt), M, L);
    check_launch(sort_segments(int_vec(indices), M, L, s.perm.data_ptr<int64_t>(), s.seg_start.data_ptr<int32_t>(),
                               s.tile_start.data_ptr<int32_t>(), stream),
                 "sort_segments");
    return s;
  }
  Tensor keys = at::empty({M}, iopt);
  check_launch(make_keys(int_vec(indices), M, L, keys.data_ptr<int32_t>(), stream), "make_keys");
  // int32 keys: CUB radix sort (stable)
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  SegmentTensors s(std::get<1>(sorted), at::empty({L + 2}, iopt), at::empty({L + 2}, iopt), M, L);
  check_launch(build_segments(std::get<0>(sorted).data_ptr<int32_t>(), M, L, s.seg_start.data_ptr<int32_t>(),
                              s.tile_start.data_ptr<int32_t>(), stream),
               "build_segments");
  return s;
}

// The segments of a call: the precomputed ones when given (multi_lora_segments of the same indices and
// L, e.g. cached across the layers of a model for one batch), else sorted here.
SegmentTensors segments_of(const Tensor& indices, int64_t M, int L, const OptSegments& given, cudaStream_t stream) {
  if (!std::get<0>(given).has_value()) return make_segments(indices, M, L, stream);
  return SegmentTensors(*std::get<0>(given), *std::get<1>(given), *std::get<2>(given), M, L);
}

// The segment regime's kernels: the register kernels where a call qualifies (16-bit, r_max <= 64,
// aligned rows; see rows_kernels_ok), else the shared-memory tile kernels.
// LORA_KERNELS_MULTI_SEG_KERNELS=tile forces the tile kernels, forward and backward (to compare them
// on the GPU).
bool tile_kernels_forced() {
  const char* v = std::getenv("LORA_KERNELS_MULTI_SEG_KERNELS");  // read per call (~0.1 us) so a benchmark can flip it
  return v != nullptr && std::string(v) == "tile";
}

// The backward's dA and dB: dense GEMMs over spread G and S where L R is small enough
// (spread_rows_worth), else the segment kernel. LORA_KERNELS_MULTI_OUTER=segment|gemm forces one
// (to compare them on the GPU).
bool use_outer_gemm(int L, int R) {
  const char* v = std::getenv("LORA_KERNELS_MULTI_OUTER");
  if (v != nullptr && std::string(v) == "segment") return false;
  if (v != nullptr && std::string(v) == "gemm") return true;
  return spread_rows_worth(L, R);
}

bool use_rows_kernels(DType dt, const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& y) {
  return !tile_kernels_forced() && rows_kernels_ok(dt, x.data_ptr(), x.stride(0), x.size(1), A.data_ptr(), B.data_ptr(),
                                       static_cast<int>(A.size(1)), y.data_ptr(), y.stride(0), y.size(1));
}

// LORA_KERNELS_MULTI_ROWS_BPS=<shrink>,<expand>: the register kernels' grid targets in blocks per SM
// (tuning sweeps on the GPU; unset or 0: the launchers' defaults).
std::pair<int, int> rows_blocks_per_sm() {
  const char* v = std::getenv("LORA_KERNELS_MULTI_ROWS_BPS");
  int shrink = 0, expand = 0;
  if (v != nullptr && std::sscanf(v, "%d,%d", &shrink, &expand) != 2) shrink = expand = 0;
  return {std::max(0, std::min(shrink, 64)), std::max(0, std::min(expand, 64))};
}

// The register shrink's L2 prefetch (rows_prefetch in multi_lora_kernels.cu) for a call that sorts
// its rows: the raw indices when x's rows and the adapters a batch can use are worth prefetching.
IntVec prefetch_of(const Tensor& indices, int64_t M, int64_t K, int64_t R, int64_t L, int64_t esize) {
  if (L > kPrefetchMaxAdapters) return {};
  const int64_t bytes = (M * K + std::min(L, M) * R * K) * esize;
  return rows_prefetch_worth(bytes) ? int_vec(indices) : IntVec{};
}

}  // namespace

std::tuple<Tensor, Tensor> fwd_cuda_impl(const Tensor& x_in, const Tensor& A_in, const Tensor& B_in,
                                         const Tensor& indices_in, const Tensor& scales_in,
                                         const std::optional<Tensor>& ranks_in, c10::string_view regime, bool save_s,
                                         const OptSegments& segments) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t M = x_in.size(0), K = x_in.size(1), N = B_in.size(1), R = A_in.size(1), L = A_in.size(0);
  TORCH_CHECK_VALUE(R <= kMaxRank, "multi_lora: r_max = ", R, " > ", kMaxRank, ", the largest the CUDA kernels take");
  TORCH_CHECK_VALUE(L < (1 << 16), "multi_lora: at most 65535 adapters in one call, got ", L);
  const auto f32 = x_in.options().dtype(at::kFloat);
  Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || K == 0 || L == 0) {  // nothing to multiply: the LoRA term is 0
    y.zero_();
    return {y, save_s ? at::zeros({M, R}, f32) : at::empty({0}, f32)};
  }
  const Tensor x = rows_contiguous(x_in);
  const Tensor A = A_in.contiguous(), B = B_in.contiguous(), indices = indices_in.contiguous();
  const Tensor scales = scales_in.contiguous();
  const Tensor ranks = ranks_in.has_value() ? ranks_in->contiguous() : Tensor();
  const IntVec rk = ranks.defined() ? int_vec(ranks) : IntVec{};
  const DType dt = dtype_of(x);
  const int sms = sm_count(x_in.get_device());

  Tensor part, S;
  int split = 1;
  if (regime == "decode") {
    int k_chunk = 0;
    split = bgmv_shrink_split(M, K, sms, &k_chunk);
    part = at::empty({split, M, R}, f32);
    check_launch(bgmv_shrink(dt, BgmvShrinkArgs{x.data_ptr(), x.stride(0), A.data_ptr(), int_vec(indices), rk,
                                                part.data_ptr<float>(), M, K, static_cast<int>(R),
                                                static_cast<int>(L), split, k_chunk},
                             stream),
                 "bgmv_shrink");
    if (save_s && split > 1) S = at::empty({M, R}, f32);
    check_launch(bgmv_expand(dt, BgmvExpandArgs{part.data_ptr<float>(), split, B.data_ptr(), int_vec(indices), rk,
                                                scales.data_ptr<float>(), y.data_ptr(),
                                                S.defined() ? S.data_ptr<float>() : nullptr, M, N,
                                                static_cast<int>(R), static_cast<int>(L)},
                             sms, stream),
                 "bgmv_expand");
  } else {
    const bool rows = use_rows_kernels(dt, x, A, B, y);
    // Sorted in this call: where x and the adapters' A come to 16-32 MB the shrink prefetches them into
    // L2 while the sort runs; elsewhere up to kDirectMaxRows rows the register kernels find their
    // tiles' rows from the raw indices and no sort runs (direct mode).
    const bool sorts_here = !std::get<0>(segments).has_value();
    const IntVec pf = sorts_here ? prefetch_of(indices, M, K, R, L, x.element_size()) : IntVec{};
    const IntVec direct =
        rows && sorts_here && pf.ptr == nullptr && rows_direct_ok(M, static_cast<int>(L)) ? int_vec(indices) : IntVec{};
    const SegmentTensors seg = direct.ptr != nullptr ? SegmentTensors(M, static_cast<int>(L))
                                                     : segments_of(indices, M, static_cast<int>(L), segments, stream);
    int64_t d_chunk = 0;
    const auto bps = rows_blocks_per_sm();
    split = rows ? rows_shrink_split(M, static_cast<int>(L), K, sms, &d_chunk, bps.first)
                 : sgmv_shrink_split(M, static_cast<int>(L), K, static_cast<int>(R), sms, &d_chunk);
    part = at::empty({split, M, R}, f32);
    SgmvShrinkArgs sa{x.data_ptr(), x.stride(0), A.data_ptr(), /*w_d_contiguous=*/true, K, static_cast<int>(R),
                      static_cast<int>(L), seg.view, rk, part.data_ptr<float>(), M, split, d_chunk};
    sa.direct = direct;
    check_launch(rows ? rows_shrink(dt, sa, stream, pf) : sgmv_shrink(dt, sa, stream), "segment shrink");
    if (save_s && split > 1) S = at::empty({M, R}, f32);
    SgmvExpandArgs ea{part.data_ptr<float>(), split, B.data_ptr(), /*v_c_contiguous=*/true, N,
                      static_cast<int>(R), static_cast<int>(L), seg.view, rk, scales.data_ptr<float>(),
                      y.data_ptr(), N, S.defined() ? S.data_ptr<float>() : nullptr, M};
    ea.direct = direct;
    check_launch(rows ? rows_expand(dt, ea, sms, stream, bps.second) : sgmv_expand(dt, ea, sms, stream),
                 "segment expand");
  }
  if (!save_s) return {y, at::empty({0}, f32)};
  if (split == 1) return {y, part.select(0, 0)};
  if (N == 0) return {y, part.sum(0)};  // the expand, which writes S, had nothing to do
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cuda_impl(const Tensor& dy_in, const Tensor& x_in, const Tensor& A_in,
                                                         const Tensor& B_in, const Tensor& indices_in,
                                                         const Tensor& scales_in, const std::optional<Tensor>& ranks_in,
                                                         const Tensor& S_in, bool need_dx, bool need_dA,
                                                         bool need_dB, const OptSegments& segments) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t M = x_in.size(0), K = x_in.size(1), N = B_in.size(1), R = A_in.size(1), L = A_in.size(0);
  TORCH_CHECK_VALUE(R <= kMaxRank, "multi_lora: r_max = ", R, " > ", kMaxRank, ", the largest the CUDA kernels take");
  TORCH_CHECK_VALUE(L < (1 << 16), "multi_lora: at most 65535 adapters in one call, got ", L);
  const auto f32 = x_in.options().dtype(at::kFloat);
  if (M == 0 || L == 0) {  // no row has an adapter: every gradient is 0
    return {need_dx ? at::zeros({M, K}, x_in.options()) : at::empty({0}, x_in.options()),
            need_dA ? at::zeros_like(A_in) : at::empty({0}, A_in.options()),
            need_dB ? at::zeros_like(B_in) : at::empty({0}, B_in.options()), at::zeros({M, R}, f32)};
  }
  const Tensor dy = rows_contiguous(dy_in), x = rows_contiguous(x_in);
  const Tensor A = A_in.contiguous(), B = B_in.contiguous(), indices = indices_in.contiguous();
  const Tensor scales = scales_in.contiguous();
  const Tensor ranks = ranks_in.has_value() ? ranks_in->contiguous() : Tensor();
  const IntVec rk = ranks.defined() ? int_vec(ranks) : IntVec{};
  const DType dt = dtype_of(x);
  const int sms = sm_count(x_in.get_device());
  const int Li = static_cast<int>(L), Ri = static_cast<int>(R);
  const SegmentTensors seg = segments_of(indices, M, Li, segments, stream);

  // G = dy @ B_l [M, R] and dx = s * G @ A_l [M, K]: the forward's shrink and expand with the roles
  // swapped (dy for x, B_l.T for A_l, A_l.T for B_l). Where the register kernels qualify (16-bit,
  // R % 8 == 0, aligned rows; see rows_kernels_ok) they take B.T [L, R, N] and A.T [L, K, R], copied
  // here (L R (N + K) elements, ~1 MB at L = 8, r = 16, N = K = 4096), and the expand sums the shrink's
  // split partials into G as it goes, as the forward's does into S. The transposes come before the
  // shrink: the expand reads A.T before it waits on the shrink (see rows_expand_kernel). H100, 8173 rows
  // over 8 adapters, r16, N = K = 4096: the tile kernels took 82 us (dy @ B) and 70 us (G @ A), at
  // 26% and 20% of the DRAM bandwidth (ncu); the register kernels take that shape's forward in 41 and 37.
  const Tensor dx_out = need_dx ? at::empty({M, K}, x.options()) : Tensor();
  const auto bps = rows_blocks_per_sm();
  Tensor Bt, At;
  // (N, K > 0: with nothing to reduce or nothing to write, the expand would not write G)
  bool rows = !tile_kernels_forced() && dt != DType::kFloat32 && R % 8 == 0 && R <= 64 && N > 0 && K > 0;
  if (rows) {
    Bt = B.transpose(1, 2).contiguous();
    if (need_dx) {
      At = A.transpose(1, 2).contiguous();
      rows = rows_kernels_ok(dt, dy.data_ptr(), dy.stride(0), N, Bt.data_ptr(), At.data_ptr(), Ri,
                             dx_out.data_ptr(), K, K);
    } else {  // only the shrink runs: dy stands in for the expand's operands in the check
      rows = rows_kernels_ok(dt, dy.data_ptr(), dy.stride(0), N, Bt.data_ptr(), Bt.data_ptr(), Ri, dy.data_ptr(),
                             dy.stride(0), N);
    }
  }
  int64_t d_chunk = 0;
  const int split = rows ? rows_shrink_split(M, Li, N, sms, &d_chunk, bps.first)
                         : sgmv_shrink_split(M, Li, N, Ri, sms, &d_chunk);
  Tensor g_part = at::empty({split, M, R}, f32);
  SgmvShrinkArgs ga{dy.data_ptr(), dy.stride(0), rows ? Bt.data_ptr() : B.data_ptr(), /*w_d_contiguous=*/rows, N,
                    Ri, Li, seg.view, rk, g_part.data_ptr<float>(), M, split, d_chunk};
  check_launch(rows ? rows_shrink(dt, ga, stream) : sgmv_shrink(dt, ga, stream), "segment shrink (dy @ B)");

  Tensor dx = at::empty({0}, x.options());
  Tensor G;
  if (need_dx && rows) {  // the expand also writes G (the partials' sum) where there are several
    G = split == 1 ? g_part.select(0, 0) : at::empty({M, R}, f32);
    SgmvExpandArgs ea{g_part.data_ptr<float>(), split, At.data_ptr(), /*v_c_contiguous=*/true, K, Ri, Li, seg.view,
                      rk, scales.data_ptr<float>(), dx_out.data_ptr(), K,
                      split > 1 ? G.data_ptr<float>() : nullptr, M};
    check_launch(rows_expand(dt, ea, sms, stream, bps.second), "segment expand (G @ A)");
    dx = dx_out;
  } else {
    G = split == 1 ? g_part.select(0, 0) : g_part.sum(0);
    if (need_dx) {  // dx = s * G @ A_l: the expand with V = A [L, R, K] read along K
      check_launch(sgmv_expand(dt, SgmvExpandArgs{G.data_ptr<float>(), 1, A.data_ptr(), /*v_c_contiguous=*/false, K,
                                                  Ri, Li, seg.view, rk, scales.data_ptr<float>(), dx_out.data_ptr(),
                                                  K, nullptr, M},
                               sms, stream),
                   "sgmv_expand (G @ A)");
      dx = dx_out;
    }
  }

  // dA[l] = s * G_l.T @ x_l, dB[l] = s * dy_l.T @ S_l, per adapter over its own rows
  // G and S (fp32, [M, R]) are rounded to x's dtype first, as the tensor-core operands of a 16-bit
  // matmul chain are, so that both operands stream through the kernel's cp.async ring.
  auto reduce = [&](const Tensor& U, const Tensor& V, int64_t P, int64_t Q, bool rank_on_p, const Tensor& like,
                    const char* what) {
    const int runs = seg_outer_split(M, Li, P, Q, sms);
    Tensor out = runs == 1 ? at::empty_like(like) : Tensor();
    Tensor ws = runs > 1 ? at::empty({runs, L, P, Q}, f32) : Tensor();
    check_launch(seg_outer(dt, SegOuterArgs{U.data_ptr(), U.stride(0), V.data_ptr(), V.stride(0), P, Q,
                                            Ri, Li, rank_on_p, seg.view, rk, scales.data_ptr<float>(),
                                            runs == 1 ? out.data_ptr() : nullptr,
                                            runs > 1 ? ws.data_ptr<float>() : nullptr, runs, M},
                           stream),
                 what);
    return runs == 1 ? out : ws.sum(0).to(like.scalar_type());
  };
  Tensor dA = at::empty({0}, A.options());
  Tensor dB = at::empty({0}, B.options());
  if (use_outer_gemm(Li, Ri)) {  // one GEMM each over [M, L R] spreads of G and S (see spread_rows_kernel)
    const IntVec idx = int_vec(indices);
    auto spread = [&](const Tensor& U) {
      const Tensor Uc = U.contiguous();
      Tensor out = at::empty({M, L * R}, x.options());
      check_launch(spread_rows(dt, Uc.data_ptr<float>(), idx, rk, scales.data_ptr<float>(), out.data_ptr(), M, Ri, Li,
                               stream),
                   "spread_rows");
      return out;
    };
    if (need_dA) dA = at::mm(spread(G).t(), x).view({L, R, K});                                   // [L R, K]
    if (need_dB) dB = at::mm(dy.t(), spread(S_in)).view({N, L, R}).permute({1, 0, 2}).contiguous();  // [N, L R]
    return {dx, dA, dB, G};
  }
  if (need_dA) dA = reduce(G.to(x.scalar_type()), x, R, K, /*rank_on_p=*/true, A, "seg_outer (dA)");
  if (need_dB) dB = reduce(dy, S_in.to(x.scalar_type()).contiguous(), N, R, /*rank_on_p=*/false, B, "seg_outer (dB)");
  return {dx, dA, dB, G};
}

std::tuple<Tensor, Tensor, Tensor> segments_cuda_impl(const Tensor& indices_in, int64_t L) {
  const c10::cuda::CUDAGuard guard(indices_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor indices = indices_in.contiguous();
  const SegmentTensors s = make_segments(indices, indices.size(0), static_cast<int>(L), stream);
  return {s.perm, s.seg_start, s.tile_start};
}

}  // namespace lora_kernels
