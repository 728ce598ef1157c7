// PyTorch binding of the top-k union kernel: torch.ops.sed_kernels.topk_union(Tensor logits, int k) -> Tensor.
// Built on demand by sed_export/cuda_ops.py (torch.utils.cpp_extension.load); CUDA tensors only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../topk_union.h"

namespace {

// Sorted int64 indices of the classes in the top-k of at least one pixel; logits (C, ...) fp32/fp16 on CUDA.
// Synchronises once (like torch.nonzero) to read the kept count.
at::Tensor topk_union_cuda(at::Tensor const& logits, int64_t k) {
  TORCH_CHECK(logits.is_cuda(), "sed_kernels::topk_union: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() >= 1, "sed_kernels::topk_union: logits must have a class axis first");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf,
              "sed_kernels::topk_union: logits must be float32 or float16, got ", logits.scalar_type());
  TORCH_CHECK(k >= 1, "sed_kernels::topk_union: k must be >= 1, got ", k);
  c10::cuda::CUDAGuard guard(logits.device());
  int64_t const classes = logits.size(0);
  if (classes == 0) return at::empty({0}, logits.options().dtype(at::kLong));
  at::Tensor flat = logits.reshape({classes, logits.numel() / classes}).contiguous();  // P may be 0
  int64_t const pixels = flat.size(1);
  auto const idx_opts = flat.options().dtype(at::kLong);
  at::Tensor kept = at::empty({classes}, idx_opts);
  at::Tensor count = at::zeros({}, idx_opts);
  size_t const ws_bytes = sed_kernels::topk_union_workspace_size(classes);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, flat.options().dtype(at::kByte));
  auto const dtype = flat.scalar_type() == at::kHalf ? sed_kernels::TopkUnionDType::kFloat16
                                                     : sed_kernels::TopkUnionDType::kFloat32;
  cudaError_t const err = sed_kernels::topk_union_launch(
      flat.data_ptr(), dtype, classes, pixels, nullptr, k, kept.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
      workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sed_kernels::topk_union: launch failed: ", cudaGetErrorString(err));
  return kept.slice(0, 0, count.item<int64_t>());
}

}  // namespace

TORCH_LIBRARY(sed_kernels, m) { m.def("topk_union(Tensor logits, int k) -> Tensor"); }

TORCH_LIBRARY_IMPL(sed_kernels, CUDA, m) { m.impl("topk_union", &topk_union_cuda); }
