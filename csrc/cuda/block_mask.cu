// Launcher of the causal_block_mask CUDA kernels (csrc/cuda/block_mask.cuh): raw pointers, sizes
// and a stream in, kernels enqueued, nothing waited for.
#include <cuda_runtime.h>

#include "cuda/block_mask.cuh"
#include "cuda/block_mask_launch.h"

namespace streamssl {
namespace cuda {
namespace {

int64_t element_size(BlockMaskDtype dtype) {
  switch (dtype) {
    case BlockMaskDtype::kFloat64:
      return 8;
    case BlockMaskDtype::kFloat32:
      return 4;
    case BlockMaskDtype::kFloat16:
    case BlockMaskDtype::kBFloat16:
      return 2;
  }
  return 0;
}

template <typename V>
void launch_write(const cuda_kernels::BlockMaskLaunchConfig& c, const void* feats, const void* emb,
                  const bool* mask, void* out, cudaStream_t stream) {
  const V* x = static_cast<const V*>(feats);
  const V* e = static_cast<const V*>(emb);
  V* y = static_cast<V*>(out);
  if (c.index32) {
    cuda_kernels::block_mask_write_kernel<V, uint32_t>
        <<<c.write_grid, c.write_block, c.smem_bytes, stream>>>(
            x, e, mask, y, static_cast<uint32_t>(c.n_vecs), static_cast<uint32_t>(c.vecs_per_row));
  } else {
    cuda_kernels::block_mask_write_kernel<V, uint64_t>
        <<<c.write_grid, c.write_block, c.smem_bytes, stream>>>(
            x, e, mask, y, static_cast<uint64_t>(c.n_vecs), static_cast<uint64_t>(c.vecs_per_row));
  }
}

}  // namespace

const char* launch_causal_block_mask(const void* feats, const int64_t* lengths,
                                     const void* mask_embedding, void* masked, bool* mask,
                                     int64_t B, int64_t T, int64_t F, BlockMaskDtype dtype,
                                     const BlockMaskRule& rule, void* stream) {
  const int64_t elem = element_size(dtype);
  if (elem == 0) return "causal_block_mask: unknown dtype code";
  if (B == 0 || T == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cuda_kernels::BlockMaskLaunchConfig c = cuda_kernels::block_mask_launch_config(
      B, T, F, elem, reinterpret_cast<uintptr_t>(feats), reinterpret_cast<uintptr_t>(mask_embedding),
      reinterpret_cast<uintptr_t>(masked));
  cuda_kernels::block_mask_scan_kernel<<<c.scan_grid, c.scan_block, c.smem_bytes, s>>>(
      rule, lengths, mask, B, T);
  if (c.n_vecs > 0) {
    switch (c.vec_bytes) {
      case 16:
        launch_write<cuda_kernels::Bytes16>(c, feats, mask_embedding, mask, masked, s);
        break;
      case 8:
        launch_write<cuda_kernels::Bytes8>(c, feats, mask_embedding, mask, masked, s);
        break;
      case 4:
        launch_write<uint32_t>(c, feats, mask_embedding, mask, masked, s);
        break;
      case 2:
        launch_write<uint16_t>(c, feats, mask_embedding, mask, masked, s);
        break;
      default:
        launch_write<uint8_t>(c, feats, mask_embedding, mask, masked, s);
        break;
    }
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace streamssl
