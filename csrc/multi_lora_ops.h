// What multi_lora.cpp (schemas, checks, CPU implementation, registrations) and multi_lora_cuda.cpp
// (the CUDA glue) share: the precomputed segments a call may bring, and the CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lora_kernels {

// (perm [M] int64, seg_start [L + 2] int32, tile_start [L + 2] int32) from multi_lora_segments of the
// same indices and L, or three empty optionals: the op sorts the rows itself.
using OptSegments = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

#ifdef WITH_CUDA
// Inputs already checked by the callers in multi_lora.cpp.
std::tuple<at::Tensor, at::Tensor> fwd_cuda_impl(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                 const at::Tensor& indices, const at::Tensor& scales,
                                                 const std::optional<at::Tensor>& ranks, c10::string_view regime,
                                                 bool save_s, const OptSegments& segments);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& indices,
    const at::Tensor& scales, const std::optional<at::Tensor>& ranks, const at::Tensor& S, bool need_dx,
    bool need_dA, bool need_dB, const OptSegments& segments);
std::tuple<at::Tensor, at::Tensor, at::Tensor> segments_cuda_impl(const at::Tensor& indices, int64_t L);
#endif

}  // namespace lora_kernels
