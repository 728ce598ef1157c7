// Top-k union kernels: see topk_union.h for the contract and the ranking rule.
//
// Three steps, all enqueued on one stream:
//   1. zero a 32-bit flag per class (workspace);
//   2. flag every class that is in some pixel's top-k:
//        k <= 32: each pixel is scanned by 8 threads (class slices), each keeping its k best keys in
//                 registers (sorted, insertion network), merged by a shared-memory tree; coalesced loads
//                 (neighbouring threads read neighbouring pixels of one class row);
//        32 < k < C: one warp per pixel finds the k-th largest key by a 64-step binary search over the key
//                 space (a rarely used fallback: correct for any k, slower);
//   3. one block compacts the flags into ascending indices with a ballot/shuffle prefix sum and writes the
//      count (k >= C: every class; k <= 0: none).
// With k on the device (TensorRT) both step-2 kernels are launched and the one not matching k returns at
// once; with k on the host (torch op) only the matching one is launched.
//
// Every (value, class) pair maps to a distinct uint64 key whose integer order is the ranking rule, so a
// single compare decides a pair and the k best of a pixel are a unique set: the order in which classes are
// visited or merged cannot change the result.
#include "topk_union.h"

#include <cuda_fp16.h>

namespace sed_kernels {
namespace detail {

using Key = unsigned long long;

constexpr int kPixelsPerBlock = 32;  // threadIdx.x: pixel in the tile
constexpr int kSlices = 8;           // threadIdx.y: class slice
constexpr int kCompactThreads = 1024;
constexpr Key kSentinel = ~0ull;  // above every real key: pads the register list when k < its capacity
constexpr Key kEmpty = 0ull;      // below every real key: an unfilled slot

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// High word: value in an order-preserving unsigned form (NaN -> max, -0.0 -> +0.0); low word: 0x7FFFFFFF - c,
// so a lower class index wins a tie. The smallest real key is (0x007FFFFF << 32) > kEmpty.
__device__ __forceinline__ Key make_key(float v, int c) {
  unsigned int bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (v != v) ordered = 0xFFFFFFFFu;
  return (static_cast<Key>(ordered) << 32) | static_cast<Key>(0x7FFFFFFFu - static_cast<unsigned int>(c));
}

__device__ __forceinline__ int key_class(Key key) {
  return static_cast<int>(0x7FFFFFFFu - static_cast<unsigned int>(key & 0xFFFFFFFFull));
}

__device__ __forceinline__ int64_t read_k(int64_t const* k_device, int64_t k_host) {
  return k_device != nullptr ? *k_device : k_host;
}

// Descending list; slots [0, CAP - k) hold kSentinel so the k-th best is always list[CAP - 1].
template <int CAP>
__device__ __forceinline__ void insert(Key (&list)[CAP], Key x) {
  if (x <= list[CAP - 1]) return;
#pragma unroll
  for (int j = CAP - 1; j > 0; --j) {
    Key prev = list[j - 1];
    list[j] = prev < x ? prev : (list[j] < x ? x : list[j]);
  }
  list[0] = list[0] < x ? x : list[0];
}

template <typename T, int CAP>
__device__ void select_register(T const* __restrict__ logits, int num_classes, int num_pixels, int k,
                                unsigned int* __restrict__ flags, Key (*buf)[kTopkUnionRegisterMaxK][kPixelsPerBlock]) {
  int const lane = threadIdx.x;
  int const slice = threadIdx.y;
  int const p = blockIdx.x * kPixelsPerBlock + lane;
  bool const active = p < num_pixels;

  Key list[CAP];
#pragma unroll
  for (int j = 0; j < CAP; ++j) list[j] = j < CAP - k ? kSentinel : kEmpty;

  if (active) {
    size_t const stride = static_cast<size_t>(num_pixels);
    int c = slice;
    // Four loads in flight before any insertion: the scan is latency-bound, not compute-bound.
    for (; c + 3 * kSlices < num_classes; c += 4 * kSlices) {
      float v0 = to_float(logits[static_cast<size_t>(c) * stride + p]);
      float v1 = to_float(logits[static_cast<size_t>(c + kSlices) * stride + p]);
      float v2 = to_float(logits[static_cast<size_t>(c + 2 * kSlices) * stride + p]);
      float v3 = to_float(logits[static_cast<size_t>(c + 3 * kSlices) * stride + p]);
      insert(list, make_key(v0, c));
      insert(list, make_key(v1, c + kSlices));
      insert(list, make_key(v2, c + 2 * kSlices));
      insert(list, make_key(v3, c + 3 * kSlices));
    }
    for (; c < num_classes; c += kSlices) insert(list, make_key(to_float(logits[static_cast<size_t>(c) * stride + p]), c));
  }

  // Tree merge of the slices' lists: 8 -> 4 -> 2 -> 1. Every thread reaches every barrier.
#pragma unroll
  for (int half = kSlices / 2; half >= 1; half /= 2) {
    if (slice >= half && slice < 2 * half) {
#pragma unroll
      for (int j = 0; j < CAP; ++j) buf[slice - half][j][lane] = list[j];
    }
    __syncthreads();
    if (slice < half) {
#pragma unroll
      for (int j = 0; j < CAP; ++j) {
        Key x = buf[slice][j][lane];
        if (x != kSentinel) insert(list, x);
      }
    }
    __syncthreads();
  }

  if (slice == 0 && active) {
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      Key x = list[j];
      if (x != kSentinel && x != kEmpty) flags[key_class(x)] = 1u;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPixelsPerBlock* kSlices)
    flag_register_kernel(T const* __restrict__ logits, int num_classes, int num_pixels, int64_t const* k_device,
                         int64_t k_host, unsigned int* __restrict__ flags) {
  __shared__ Key buf[kSlices / 2][kTopkUnionRegisterMaxK][kPixelsPerBlock];
  int64_t const k = read_k(k_device, k_host);
  if (k <= 0 || k >= num_classes || k > kTopkUnionRegisterMaxK) return;  // uniform over the grid
  int const kk = static_cast<int>(k);
  // Uniform branch: the whole grid takes the same capacity.
  if (kk <= 1) {
    select_register<T, 1>(logits, num_classes, num_pixels, kk, flags, buf);
  } else if (kk <= 2) {
    select_register<T, 2>(logits, num_classes, num_pixels, kk, flags, buf);
  } else if (kk <= 4) {
    select_register<T, 4>(logits, num_classes, num_pixels, kk, flags, buf);
  } else if (kk <= 8) {
    select_register<T, 8>(logits, num_classes, num_pixels, kk, flags, buf);
  } else if (kk <= 16) {
    select_register<T, 16>(logits, num_classes, num_pixels, kk, flags, buf);
  } else {
    select_register<T, 32>(logits, num_classes, num_pixels, kk, flags, buf);
  }
}

template <typename T>
__device__ __forceinline__ int count_at_least(T const* __restrict__ logits, int num_classes, size_t stride, int p,
                                              int lane, Key threshold) {
  int n = 0;
  for (int c = lane; c < num_classes; c += 32) {
    n += make_key(to_float(logits[static_cast<size_t>(c) * stride + p]), c) >= threshold ? 1 : 0;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xFFFFFFFFu, static_cast<unsigned int>(n));  // one instruction from sm_80 (Ampere)
#else
  for (int offset = 16; offset > 0; offset >>= 1) n += __shfl_xor_sync(0xFFFFFFFFu, n, offset);  // Turing: 5 shuffles
  return n;
#endif
}

template <typename T>
__global__ void flag_search_kernel(T const* __restrict__ logits, int num_classes, int num_pixels,
                                   int64_t const* k_device, int64_t k_host, unsigned int* __restrict__ flags) {
  int64_t const k = read_k(k_device, k_host);
  if (k <= kTopkUnionRegisterMaxK || k >= num_classes) return;
  int const lane = threadIdx.x & 31;
  long long const warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= num_pixels) return;  // whole warp
  int const p = static_cast<int>(warp);
  size_t const stride = static_cast<size_t>(num_pixels);
  // Largest threshold t with #{key >= t} >= k: keys are distinct, so t is exactly the k-th largest key.
  Key lo = 0ull;
  Key hi = ~0ull;
  while (lo < hi) {
    Key mid = lo + (hi - lo) / 2 + 1;
    if (count_at_least(logits, num_classes, stride, p, lane, mid) >= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  for (int c = lane; c < num_classes; c += 32) {
    if (make_key(to_float(logits[static_cast<size_t>(c) * stride + p]), c) >= lo) flags[c] = 1u;
  }
}

__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(unsigned int const* __restrict__ flags, int num_classes, int64_t const* k_device, int64_t k_host,
                   int64_t* __restrict__ kept, int64_t* __restrict__ count) {
  __shared__ int warp_offset[kCompactThreads / 32];
  __shared__ int chunk_total;
  int64_t const k = read_k(k_device, k_host);
  bool const keep_all = k >= num_classes;
  bool const keep_none = k <= 0;
  int const tid = threadIdx.x;
  int const lane = tid & 31;
  int const warp = tid >> 5;
  int base = 0;
  for (int start = 0; start < num_classes; start += kCompactThreads) {
    int const c = start + tid;
    bool const hit = !keep_none && c < num_classes && (keep_all || flags[c] != 0u);
    unsigned int const ballot = __ballot_sync(0xFFFFFFFFu, hit);
    int const before_me = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_offset[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      int const v = warp_offset[lane];  // kCompactThreads / 32 == 32 warps
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        int const n = __shfl_up_sync(0xFFFFFFFFu, incl, off);
        if (lane >= off) incl += n;
      }
      warp_offset[lane] = incl - v;
      if (lane == 31) chunk_total = incl;
    }
    __syncthreads();
    if (hit) kept[base + warp_offset[warp] + before_me] = c;
    base += chunk_total;
    __syncthreads();  // warp_offset / chunk_total are rewritten by the next chunk
  }
  if (tid == 0) *count = base;
}

static_assert(kCompactThreads == 32 * 32, "compaction scans exactly one warp of warp totals");

template <typename T>
cudaError_t launch_flags(T const* logits, int num_classes, int num_pixels, int64_t const* k_device, int64_t k_host,
                         unsigned int* flags, cudaStream_t stream) {
  bool const k_known = k_device == nullptr;
  bool const want_register = !k_known || (k_host > 0 && k_host < num_classes && k_host <= kTopkUnionRegisterMaxK);
  bool const want_search = !k_known || (k_host > kTopkUnionRegisterMaxK && k_host < num_classes);
  if (num_pixels == 0) return cudaSuccess;
  if (want_register) {
    dim3 const block(kPixelsPerBlock, kSlices);
    dim3 const grid(static_cast<unsigned int>((num_pixels + kPixelsPerBlock - 1) / kPixelsPerBlock));
    flag_register_kernel<T><<<grid, block, 0, stream>>>(logits, num_classes, num_pixels, k_device, k_host, flags);
    cudaError_t const err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (want_search) {
    int const threads = 256;
    long long const blocks = (static_cast<long long>(num_pixels) * 32 + threads - 1) / threads;
    flag_search_kernel<T><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(logits, num_classes, num_pixels,
                                                                                     k_device, k_host, flags);
    cudaError_t const err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace detail

#ifndef SED_CUDA_ARCHS
#define SED_CUDA_ARCHS "unknown"
#endif
// Searchable in the library file ("SED_CUDA_ARCHS=80,86,90"), so a bundle records the architectures without
// loading the library, and the runtime refuses it at load on a GPU it cannot run on.
char const* topk_union_cuda_archs() noexcept {
  static char const marker[] = "SED_CUDA_ARCHS=" SED_CUDA_ARCHS;
  return marker + sizeof("SED_CUDA_ARCHS=") - 1;
}

size_t topk_union_workspace_size(int64_t num_classes) noexcept {
  if (num_classes <= 0) return 256;
  size_t const bytes = static_cast<size_t>(num_classes) * sizeof(unsigned int);
  return (bytes + 255) / 256 * 256;
}

cudaError_t topk_union_launch(void const* logits, TopkUnionDType dtype, int64_t num_classes, int64_t num_pixels,
                              int64_t const* k_device, int64_t k_host, int64_t* kept, int64_t* count,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) noexcept {
  constexpr int64_t kMaxDim = 0x7FFFFFFF;
  if (num_classes < 0 || num_pixels < 0 || num_classes >= kMaxDim || num_pixels >= kMaxDim) {
    return cudaErrorInvalidValue;
  }
  if (count == nullptr) return cudaErrorInvalidValue;
  if (num_classes == 0) return cudaMemsetAsync(count, 0, sizeof(int64_t), stream);
  if (logits == nullptr || kept == nullptr || workspace == nullptr ||
      workspace_bytes < topk_union_workspace_size(num_classes)) {
    return cudaErrorInvalidValue;
  }
  auto* flags = static_cast<unsigned int*>(workspace);
  cudaError_t err = cudaMemsetAsync(flags, 0, static_cast<size_t>(num_classes) * sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  int const c = static_cast<int>(num_classes);
  int const p = static_cast<int>(num_pixels);
  if (dtype == TopkUnionDType::kFloat32) {
    err = detail::launch_flags(static_cast<float const*>(logits), c, p, k_device, k_host, flags, stream);
  } else if (dtype == TopkUnionDType::kFloat16) {
    err = detail::launch_flags(static_cast<__half const*>(logits), c, p, k_device, k_host, flags, stream);
  } else {
    return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  detail::compact_kernel<<<1, detail::kCompactThreads, 0, stream>>>(flags, c, k_device, k_host, kept, count);
  return cudaGetLastError();
}

}  // namespace sed_kernels
