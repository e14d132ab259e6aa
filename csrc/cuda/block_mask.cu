// Launcher of the causal_block_mask CUDA kernels (csrc/cuda/block_mask.cuh): raw pointers, sizes
// and a stream in, kernels enqueued, nothing waited for.
#include <cuda_runtime.h>

#include "cuda/block_mask.cuh"
#include "cuda/block_mask_launch.h"

namespace streamssl {
namespace cuda {
namespace {

int64_t element_size(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat64:
      return 8;
    case Dtype::kFloat32:
      return 4;
    case Dtype::kFloat16:
    case Dtype::kBFloat16:
      return 2;
  }
  return 0;
}

}  // namespace

const char* launch_causal_block_mask(const void* feats, const int64_t* lengths,
                                     const void* mask_embedding, void* masked, bool* mask,
                                     int64_t B, int64_t T, int64_t F, Dtype dtype,
                                     const BlockMaskRule& rule, void* stream) {
  const int64_t elem = element_size(dtype);
  if (elem == 0) return "causal_block_mask: unknown dtype code";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cuda_kernels::block_mask_enqueue(
      [s](auto kernel, dim3 grid, dim3 block, size_t smem, auto... args) {
        kernel<<<grid, block, smem, s>>>(args...);
        return 0;
      },
      rule, feats, lengths, mask_embedding, masked, mask, B, T, F, elem);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace streamssl
