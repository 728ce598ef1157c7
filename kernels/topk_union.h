// Top-k union of class logits on the GPU: the classes that are in the top-k of at least one pixel.
//
// Shared by the PyTorch op (kernels/torch/) and the TensorRT plugin (kernels/plugin/). Includes no
// TensorRT header on purpose: it compiles and is tested with nvcc alone.
//
// Ranking rule (a total order, identical to ONNX TopK / ONNX Runtime and to
// sed_runtime/topk_union_rule.py): per pixel, NaN ranks above every number, larger values rank higher,
// -0.0 == +0.0, and equal values rank by lower class index first. The kept set is the ascending union
// over pixels of each pixel's first min(k, C) classes; k >= C keeps every class, k <= 0 keeps none.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace sed_kernels {

enum class TopkUnionDType : int32_t { kFloat32 = 0, kFloat16 = 1 };

// Largest k served by the in-register selection; larger k (still < C) use a per-pixel radix search.
constexpr int32_t kTopkUnionRegisterMaxK = 32;

// The CUDA architectures this code was compiled for, as CMake listed them ("80,86,90").
char const* topk_union_cuda_archs() noexcept;

// Device workspace in bytes for `num_classes` classes (one 32-bit flag per class, 256-byte rounded).
size_t topk_union_workspace_size(int64_t num_classes) noexcept;

// Enqueue the top-k union on `stream`; never synchronises.
//   logits     device, num_classes x num_pixels, row-major (class-major, like the decoder's (C, H*W)), dtype
//   k_device   optional device pointer to one int64 k (read on the device: the TensorRT plugin's k input);
//              when null, k_host is used (the torch op). Either way no host read of k is needed.
//   kept       device int64[num_classes]: the first *count entries are the kept class indices, ascending;
//              the rest are left unchanged
//   count      device int64 scalar
//   workspace  device, at least topk_union_workspace_size(num_classes) bytes
// Returns cudaErrorInvalidValue for bad sizes or null pointers, else the first launch error.
// Limits: 0 <= num_classes, num_pixels < 2^31.
cudaError_t topk_union_launch(void const* logits, TopkUnionDType dtype, int64_t num_classes, int64_t num_pixels,
                              int64_t const* k_device, int64_t k_host, int64_t* kept, int64_t* count,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) noexcept;

}  // namespace sed_kernels
