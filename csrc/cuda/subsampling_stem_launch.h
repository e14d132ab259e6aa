// Host entry points of the subsampling stem's fused-backward CUDA kernels: plain C++ (no CUDA or
// PyTorch headers), so csrc/ops.cpp can call them from a translation unit g++ compiles.
//
// Pointers are device pointers to contiguous tensors of one dtype (float32 or float64);
// `stream` is the cudaStream_t of the current device. The launcher enqueues its kernels and
// returns without waiting: nullptr on success, else the CUDA error text (a static string).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace streamssl {
namespace cuda {

struct StemProblem {
  int64_t B, T, F, C, pad;
  bool float64;
};

// Bytes of device workspace the backward needs (the caller allocates them, 16-byte aligned).
size_t subsampling_stem_workspace_bytes(const StemProblem& p);

// grad_y1 (B, T1, F1, C), y0 (B, T0, F0, C), feats (B, T, F), w1 (C, 3, 3) ->
// grad_w0 (C, 3, 3), grad_b0 (C,), grad_w1 (C, 3, 3).
const char* launch_subsampling_stem_backward(const StemProblem& p, const void* grad_y1,
                                             const void* y0, const void* feats, const void* w1,
                                             void* grad_w0, void* grad_b0, void* grad_w1,
                                             void* workspace, void* stream);

}  // namespace cuda
}  // namespace streamssl
