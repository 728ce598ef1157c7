// C entry points of the top-k-union kernel, for callers that are not C++: the TensorRT backend of the split
// decoder loads libsed_topk_union.so with ctypes and runs the kernel between decoder engines on its stream.
// Plain C types only; the CUDA error code is returned as an int (0 = success).
#include <cstddef>
#include <cstdint>

#include "topk_union.h"

#define SED_C_API extern "C" __attribute__((visibility("default")))

// Bumped when a signature below changes; callers refuse a library with another version.
SED_C_API int sed_topk_union_abi_version() { return 1; }

SED_C_API char const* sed_topk_union_cuda_archs() { return sed_kernels::topk_union_cuda_archs(); }

SED_C_API size_t sed_topk_union_workspace_size(int64_t num_classes) {
  return sed_kernels::topk_union_workspace_size(num_classes);
}

// dtype: 0 = float32, 1 = float16. k_device may be null (then k_host is used). stream: a cudaStream_t.
SED_C_API int sed_topk_union(void const* logits, int dtype, int64_t num_classes, int64_t num_pixels,
                             int64_t const* k_device, int64_t k_host, int64_t* kept, int64_t* count, void* workspace,
                             size_t workspace_bytes, void* stream) {
  if (dtype != 0 && dtype != 1) return static_cast<int>(cudaErrorInvalidValue);
  auto const type = dtype == 0 ? sed_kernels::TopkUnionDType::kFloat32 : sed_kernels::TopkUnionDType::kFloat16;
  return static_cast<int>(sed_kernels::topk_union_launch(logits, type, num_classes, num_pixels, k_device, k_host, kept,
                                                         count, workspace, workspace_bytes,
                                                         static_cast<cudaStream_t>(stream)));
}
