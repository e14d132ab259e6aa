// Host entry point of the causal_block_mask CUDA kernels: plain C++ (no CUDA or PyTorch
// headers), so csrc/ops.cpp can call it from a translation unit g++ compiles.
#pragma once
#include <stdint.h>

#include "cuda/dtype.h"

#include "common/block_mask_rule.h"

namespace streamssl {
namespace cuda {

// Element type of feats / mask_embedding / masked. The kernels copy bits, so only the size
// matters; the code keeps the interface explicit about what the pointers hold.

// Enqueues the scan and write kernels of causal_block_mask on `stream` (a cudaStream_t) of the
// current device and returns without waiting. Pointers are device pointers to contiguous
// tensors: feats and masked (B, T, F), mask_embedding (F,), lengths (B,) int64 (clamped to
// [0, T] by the kernel), mask (B, T) bool. Returns nullptr on success, else the CUDA error text
// of the launch (a static string).
const char* launch_causal_block_mask(const void* feats, const int64_t* lengths,
                                     const void* mask_embedding, void* masked, bool* mask,
                                     int64_t B, int64_t T, int64_t F, Dtype dtype,
                                     const BlockMaskRule& rule, void* stream);

}  // namespace cuda
}  // namespace streamssl
