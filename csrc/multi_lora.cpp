// Multi-adapter LoRA ops: schemas, input checks, the C++ CPU implementation and the registrations
// (CPU always; CUDA when built with -DWITH_CUDA, the glue being in multi_lora_cuda.cpp).
//
//   y[i] = s[l] * (x[i] @ A[l, :r].T) @ B[l, :, :r].T,  l = idx[i], r = ranks[l];  y[i] = 0 where l = -1
//       x [M, K], A [L, R, K], B [L, N, R], idx [M] int32/int64 in [-1, L), s [L] fp32, ranks [L] int or None (= R)
//
// lora_kernels_ext::multi_lora_fwd -> (y [M, N] in x's dtype, S [M, R] fp32 = x[i] @ A[l, :r].T, 0 past
//     the rank and on rows without adapter; S is [0] when save_s is false)
// lora_kernels_ext::multi_lora_bwd -> (dx [M, K], dA [L, R, K], dB [L, N, R], G [M, R] fp32), with
//     G[i]   = dy[i] @ B[l, :, :r]                         (unscaled; 0 past the rank / without adapter)
//     dx[i]  = s[l] * G[i] @ A[l, :r]
//     dA[l]  = s[l] * sum_{i: idx[i] = l} G[i].T x[i]       (rows past the rank: 0)
//     dB[l]  = s[l] * sum_{i: idx[i] = l} dy[i].T S[i]      (columns past the rank: 0)
//   Each adapter's gradient comes from its own rows only; an adapter without rows gets zeros. dx, dA,
//   dB are [0] when not asked for.
// lora_kernels_ext::multi_lora_segments(indices, L) -> (perm [M] int64, seg_start [L + 2] int32,
//     tile_start [L + 2] int32): the rows sorted by adapter that the segment regime works on (CUDA).
//     fwd and bwd take them as optional last arguments, so that a caller running many calls on one
//     indices tensor (the layers of a model during one batch) sorts once; without them each call sorts.
//     Only their shapes are checked: they must be what multi_lora_segments returned for the same
//     indices and L (the Python layer passes nothing else).
//
// Index and rank values: the CPU implementation raises IndexError / ValueError on a value outside
// [-1, L) / [1, R]. The CUDA implementation does not read values back to the host (that would be a
// synchronisation per call); its kernels treat an index outside [0, L) as -1 and clamp ranks, so no
// value can cause an out-of-bounds access, and the Python layer raises before launching.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "multi_lora_ops.h"

namespace lora_kernels {

using at::Tensor;

#define MULTI_LORA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "multi_lora: ", __VA_ARGS__)
#define MULTI_LORA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "multi_lora: ", __VA_ARGS__)

struct Dims {
  int64_t M, K, N, R, L;
};

// "[d0, d1, ...]" built here: error messages do not stream IntArrayRef (a test process on the GPU
// image crashed inside such a message; std::to_string keeps the formatting local).
std::string shape_str(const Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "]";
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// Shapes, dtypes and devices: everything but the values of indices and ranks.
Dims check_inputs(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& indices, const Tensor& scales,
                  const std::optional<Tensor>& ranks) {
  MULTI_LORA_CHECK_VALUE(x.dim() == 2, "x must be 2-D [M, K], got shape ", shape_str(x));
  MULTI_LORA_CHECK_VALUE(A.dim() == 3, "lora_A must be [L, r_max, K], got shape ", shape_str(A));
  MULTI_LORA_CHECK_VALUE(B.dim() == 3, "lora_B must be [L, N, r_max], got shape ", shape_str(B));
  const Dims d{x.size(0), x.size(1), B.size(1), A.size(1), A.size(0)};
  MULTI_LORA_CHECK_VALUE(A.size(2) == d.K, "x has ", d.K, " features but lora_A is [L, r_max, K] = ", shape_str(A));
  MULTI_LORA_CHECK_VALUE(B.size(0) == d.L && B.size(2) == d.R, "lora_B is ", shape_str(B),
                         ", expected [L, N, r_max] with L = ", d.L, ", r_max = ", d.R, " (from lora_A)");
  MULTI_LORA_CHECK_VALUE(d.R >= 1, "r_max = lora_A.shape[1] is 0; adapters need rank >= 1");
  MULTI_LORA_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == d.M, "indices must be [M] = [", d.M,
                         "] (one per row of x), got shape ", shape_str(indices));
  MULTI_LORA_CHECK_TYPE(is_index_dtype(indices.scalar_type()), "indices must be int32 or int64, got ",
                        indices.scalar_type());
  MULTI_LORA_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == d.L, "scales must be [L] = [", d.L, "], got shape ",
                         shape_str(scales));
  MULTI_LORA_CHECK_TYPE(scales.scalar_type() == at::kFloat, "scales must be float32, got ", scales.scalar_type());
  if (ranks.has_value()) {
    MULTI_LORA_CHECK_VALUE(ranks->dim() == 1 && ranks->size(0) == d.L, "ranks must be [L] = [", d.L,
                           "], got shape ", shape_str(*ranks));
    MULTI_LORA_CHECK_TYPE(is_index_dtype(ranks->scalar_type()), "ranks must be int32 or int64, got ",
                          ranks->scalar_type());
  }
  MULTI_LORA_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float16, bfloat16 or float32, got ",
                        x.scalar_type());
  MULTI_LORA_CHECK_TYPE(A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type(),
                        "lora_A and lora_B must have x's dtype ", x.scalar_type(), ", got ", A.scalar_type(), " and ",
                        B.scalar_type());
  const auto dev = x.device();
  bool same = A.device() == dev && B.device() == dev && indices.device() == dev && scales.device() == dev;
  if (ranks.has_value()) same = same && ranks->device() == dev;
  MULTI_LORA_CHECK_VALUE(same, "all tensors must be on x's device ", dev);
  return d;
}

void check_regime(c10::string_view regime) {
  MULTI_LORA_CHECK_VALUE(regime == "decode" || regime == "segment", "regime must be 'decode' or 'segment', got '",
                         std::string(regime), "'");
}

// Precomputed segments (internal: the Python layer passes what multi_lora_segments returned for the
// same indices and L, cached across the layers of one batch): all three or none, shapes and dtypes.
// The messages are fixed strings: on the GPU image's torch, a message streaming this tensor's
// dtype or the expected length crashed the process while the error was raised (a segmentation
// fault, not reproduced with the CPU build's torch); these are internal arguments, so the fixed
// text says what is expected without the values.
void check_segment_tensor(const Tensor& t, int64_t n, at::ScalarType dtype, const Tensor& x, const char* what) {
  MULTI_LORA_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous() &&
                             t.device() == x.device(),
                         what);
}

OptSegments segments_arg(const std::optional<Tensor>& perm, const std::optional<Tensor>& seg_start,
                         const std::optional<Tensor>& tile_start, const Tensor& x, const Dims& d) {
  const int given = int(perm.has_value()) + int(seg_start.has_value()) + int(tile_start.has_value());
  if (given == 0) return OptSegments{};
  MULTI_LORA_CHECK_VALUE(given == 3,
                         "perm, seg_start and tile_start come together (from multi_lora_segments) or not at all");
  check_segment_tensor(*perm, d.M, at::kLong, x,
                       "perm must be a contiguous int64 tensor [M] on x's device (from multi_lora_segments)");
  check_segment_tensor(*seg_start, d.L + 2, at::kInt, x,
                       "seg_start must be a contiguous int32 tensor [L + 2] on x's device (from multi_lora_segments)");
  check_segment_tensor(*tile_start, d.L + 2, at::kInt, x,
                       "tile_start must be a contiguous int32 tensor [L + 2] on x's device (from multi_lora_segments)");
  return OptSegments{perm, seg_start, tile_start};
}

// ---------------------------------------------------------------------------------------------
// CPU implementation: one pass per row (forward, dx) and per adapter (dA, dB), fp32 accumulation.
// ---------------------------------------------------------------------------------------------
struct HostIndex {
  std::vector<int64_t> idx;    // [M]
  std::vector<int64_t> rank;   // [L]
};

HostIndex read_and_check_cpu(const Tensor& indices, const std::optional<Tensor>& ranks, int64_t L, int64_t R) {
  HostIndex h;
  const Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  h.idx.assign(ip, ip + idx.numel());
  for (size_t i = 0; i < h.idx.size(); ++i) {
    TORCH_CHECK_INDEX(h.idx[i] >= -1 && h.idx[i] < L, "multi_lora: indices[", i, "] = ", h.idx[i],
                      " is outside [-1, ", L, ") (L = lora_A.shape[0] adapters; -1 = no adapter)");
  }
  h.rank.assign(L, R);
  if (ranks.has_value()) {
    const Tensor rk = ranks->to(at::kLong).contiguous();
    const int64_t* rp = rk.data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      MULTI_LORA_CHECK_VALUE(rp[l] >= 1 && rp[l] <= R, "ranks[", l, "] = ", rp[l], " is outside [1, r_max = ", R,
                             "]");
      h.rank[l] = rp[l];
    }
  }
  return h;
}

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& x_in, const Tensor& A_in, const Tensor& B_in, const Tensor& indices,
                                   const Tensor& scales_in, const std::optional<Tensor>& ranks,
                                   c10::string_view regime, bool save_s, const std::optional<Tensor>& perm,
                                   const std::optional<Tensor>& seg_start, const std::optional<Tensor>& tile_start) {
  const Dims d = check_inputs(x_in, A_in, B_in, indices, scales_in, ranks);
  check_regime(regime);  // one loop serves both regimes on the CPU
  segments_arg(perm, seg_start, tile_start, x_in, d);  // checked, not needed: the loop goes row by row
  const HostIndex h = read_and_check_cpu(indices, ranks, d.L, d.R);
  const Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(), sc = scales_in.contiguous();
  Tensor y = at::empty({d.M, d.N}, x.options());
  Tensor S = at::empty({d.M, d.R}, x.options().dtype(at::kFloat));
  const float* sp = sc.data_ptr<float>();
  float* Sp = S.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* Bp = B.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, d.M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t l = h.idx[i];
        float* s = Sp + i * d.R;
        scalar_t* yr = yp + i * d.N;
        const int64_t r = l < 0 ? 0 : h.rank[l];
        const scalar_t* xr = xp + i * d.K;
        for (int64_t j = 0; j < d.R; ++j) {
          float acc = 0.f;
          if (j < r) {
            const scalar_t* a = Ap + (l * d.R + j) * d.K;
            for (int64_t k = 0; k < d.K; ++k) acc += static_cast<float>(xr[k]) * static_cast<float>(a[k]);
          }
          s[j] = acc;
        }
        const float scale = l < 0 ? 0.f : sp[l];
        for (int64_t n = 0; n < d.N; ++n) {
          float acc = 0.f;
          if (r > 0) {
            const scalar_t* b = Bp + (l * d.N + n) * d.R;
            for (int64_t j = 0; j < r; ++j) acc += s[j] * static_cast<float>(b[j]);
          }
          yr[n] = static_cast<scalar_t>(scale * acc);
        }
      }
    });
  });
  return {y, save_s ? S : at::empty({0}, S.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cpu(const Tensor& dy_in, const Tensor& x_in, const Tensor& A_in,
                                                   const Tensor& B_in, const Tensor& indices, const Tensor& scales_in,
                                                   const std::optional<Tensor>& ranks, const Tensor& S_in,
                                                   bool need_dx, bool need_dA, bool need_dB,
                                                   const std::optional<Tensor>& perm,
                                                   const std::optional<Tensor>& seg_start,
                                                   const std::optional<Tensor>& tile_start) {
  const Dims d = check_inputs(x_in, A_in, B_in, indices, scales_in, ranks);
  segments_arg(perm, seg_start, tile_start, x_in, d);
  MULTI_LORA_CHECK_VALUE(dy_in.dim() == 2 && dy_in.size(0) == d.M && dy_in.size(1) == d.N,
                         "grad_output must be [M, N] = [", d.M, ", ", d.N, "], got ", shape_str(dy_in));
  MULTI_LORA_CHECK_TYPE(dy_in.scalar_type() == x_in.scalar_type(), "grad_output must have x's dtype");
  MULTI_LORA_CHECK_VALUE(!need_dB || (S_in.dim() == 2 && S_in.size(0) == d.M && S_in.size(1) == d.R &&
                                      S_in.scalar_type() == at::kFloat),
                         "the saved S must be [M, r_max] float32 to compute dB, got ", shape_str(S_in));
  const HostIndex h = read_and_check_cpu(indices, ranks, d.L, d.R);
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const Tensor sc = scales_in.contiguous();
  const float* sp = sc.data_ptr<float>();

  Tensor G = at::empty({d.M, d.R}, x.options().dtype(at::kFloat));
  Tensor dx = need_dx ? at::empty({d.M, d.K}, x.options()) : at::empty({0}, x.options());
  Tensor dA = need_dA ? at::empty_like(A) : at::empty({0}, A.options());
  Tensor dB = need_dB ? at::empty_like(B) : at::empty({0}, B.options());
  std::vector<std::vector<int64_t>> rows(d.L);  // each adapter's rows, ascending: a fixed summation order
  for (int64_t i = 0; i < d.M; ++i) {
    if (h.idx[i] >= 0) rows[h.idx[i]].push_back(i);
  }
  float* Gp = G.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_bwd_cpu", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* Bp = B.data_ptr<scalar_t>();
    // G[i, j] = dy[i] . B[l, :, j]; then dx[i] = s * G[i] @ A[l, :r]
    at::parallel_for(0, d.M, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d.K);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t l = h.idx[i];
        const int64_t r = l < 0 ? 0 : h.rank[l];
        float* g = Gp + i * d.R;
        for (int64_t j = 0; j < d.R; ++j) g[j] = 0.f;
        const scalar_t* dyr = dyp + i * d.N;
        for (int64_t n = 0; n < d.N && r > 0; ++n) {
          const float v = static_cast<float>(dyr[n]);
          const scalar_t* b = Bp + (l * d.N + n) * d.R;
          for (int64_t j = 0; j < r; ++j) g[j] += v * static_cast<float>(b[j]);
        }
        if (!need_dx) continue;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < r; ++j) {
          const scalar_t* a = Ap + (l * d.R + j) * d.K;
          for (int64_t k = 0; k < d.K; ++k) acc[k] += g[j] * static_cast<float>(a[k]);
        }
        const float scale = l < 0 ? 0.f : sp[l];
        scalar_t* dxr = dx.data_ptr<scalar_t>() + i * d.K;
        for (int64_t k = 0; k < d.K; ++k) dxr[k] = static_cast<scalar_t>(scale * acc[k]);
      }
    });
    if (need_dA) {  // dA[l, j] = s * sum_{i in rows[l]} G[i, j] x[i]
      scalar_t* dAp = dA.data_ptr<scalar_t>();
      at::parallel_for(0, d.L * d.R, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(d.K);
        for (int64_t lj = begin; lj < end; ++lj) {
          const int64_t l = lj / d.R, j = lj % d.R;
          std::fill(acc.begin(), acc.end(), 0.f);
          if (j < h.rank[l]) {
            for (const int64_t i : rows[l]) {
              const float g = Gp[i * d.R + j];
              const scalar_t* xr = xp + i * d.K;
              for (int64_t k = 0; k < d.K; ++k) acc[k] += g * static_cast<float>(xr[k]);
            }
          }
          scalar_t* out = dAp + lj * d.K;
          for (int64_t k = 0; k < d.K; ++k) out[k] = static_cast<scalar_t>(sp[l] * acc[k]);
        }
      });
    }
    if (need_dB) {  // dB[l, n, j] = s * sum_{i in rows[l]} dy[i, n] S[i, j]
      const Tensor S = S_in.contiguous();
      const float* Sp = S.data_ptr<float>();
      scalar_t* dBp = dB.data_ptr<scalar_t>();
      at::parallel_for(0, d.L * d.N, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(d.R);
        for (int64_t ln = begin; ln < end; ++ln) {
          const int64_t l = ln / d.N, n = ln % d.N;
          const int64_t r = h.rank[l];
          std::fill(acc.begin(), acc.end(), 0.f);
          for (const int64_t i : rows[l]) {
            const float v = static_cast<float>(dyp[i * d.N + n]);
            for (int64_t j = 0; j < r; ++j) acc[j] += v * Sp[i * d.R + j];
          }
          scalar_t* out = dBp + ln * d.R;
          for (int64_t j = 0; j < d.R; ++j) out[j] = static_cast<scalar_t>(sp[l] * acc[j]);
        }
      });
    }
  });
  return {dx, dA, dB, G};
}

#ifdef WITH_CUDA
std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& indices,
                                    const Tensor& scales, const std::optional<Tensor>& ranks,
                                    c10::string_view regime, bool save_s, const std::optional<Tensor>& perm,
                                    const std::optional<Tensor>& seg_start, const std::optional<Tensor>& tile_start) {
  const Dims d = check_inputs(x, A, B, indices, scales, ranks);
  check_regime(regime);
  const OptSegments segments = segments_arg(perm, seg_start, tile_start, x, d);
  return fwd_cuda_impl(x, A, B, indices, scales, ranks, regime, save_s, segments);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& A,
                                                    const Tensor& B, const Tensor& indices, const Tensor& scales,
                                                    const std::optional<Tensor>& ranks, const Tensor& S,
                                                    bool need_dx, bool need_dA, bool need_dB,
                                                    const std::optional<Tensor>& perm,
                                                    const std::optional<Tensor>& seg_start,
                                                    const std::optional<Tensor>& tile_start) {
  const Dims d = check_inputs(x, A, B, indices, scales, ranks);
  MULTI_LORA_CHECK_VALUE(dy.dim() == 2 && dy.size(0) == d.M && dy.size(1) == d.N, "grad_output must be [M, N] = [",
                         d.M, ", ", d.N, "], got ", shape_str(dy));
  MULTI_LORA_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "grad_output must have x's dtype");
  MULTI_LORA_CHECK_VALUE(dy.device() == x.device() && S.device() == x.device(), "grad_output and S must be on x's device");
  MULTI_LORA_CHECK_VALUE(!need_dB || (S.dim() == 2 && S.size(0) == d.M && S.size(1) == d.R &&
                                      S.scalar_type() == at::kFloat),
                         "the saved S must be [M, r_max] float32 to compute dB, got ", shape_str(S));
  const OptSegments segments = segments_arg(perm, seg_start, tile_start, x, d);
  return bwd_cuda_impl(dy, x, A, B, indices, scales, ranks, S, need_dx, need_dA, need_dB, segments);
}

std::tuple<Tensor, Tensor, Tensor> segments_cuda(const Tensor& indices, int64_t L) {
  MULTI_LORA_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got shape ", shape_str(indices));
  MULTI_LORA_CHECK_TYPE(is_index_dtype(indices.scalar_type()), "indices must be int32 or int64, got ",
                        indices.scalar_type());
  MULTI_LORA_CHECK_VALUE(L >= 0 && L < (1 << 16), "L must lie in [0, 65536), got ", L);
  return segments_cuda_impl(indices, L);
}
#endif

}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_ext, m) {
  m.def("multi_lora_fwd(Tensor x, Tensor lora_A, Tensor lora_B, Tensor indices, Tensor scales, Tensor? ranks, "
        "str regime, bool save_s, Tensor? perm=None, Tensor? seg_start=None, Tensor? tile_start=None) "
        "-> (Tensor, Tensor)");
  m.def("multi_lora_bwd(Tensor grad_out, Tensor x, Tensor lora_A, Tensor lora_B, Tensor indices, Tensor scales, "
        "Tensor? ranks, Tensor s, bool need_dx, bool need_dA, bool need_dB, Tensor? perm=None, "
        "Tensor? seg_start=None, Tensor? tile_start=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // (perm [M] int64, seg_start [L + 2] int32, tile_start [L + 2] int32): rows sorted by adapter (stable)
  // and the kTileRows-row tile table, for the segment regime; CUDA only (the CPU loop needs none).
  m.def("multi_lora_segments(Tensor indices, int L) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_kernels_ext, CPU, m) {
  m.impl("multi_lora_fwd", &lora_kernels::fwd_cpu);
  m.impl("multi_lora_bwd", &lora_kernels::bwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels_ext, CUDA, m) {
  m.impl("multi_lora_fwd", &lora_kernels::fwd_cuda);
  m.impl("multi_lora_bwd", &lora_kernels::bwd_cuda);
  m.impl("multi_lora_segments", &lora_kernels::segments_cuda);
}
#endif
