// Host entry points of the causal_dwconv_ln CUDA kernels: plain C++ (no CUDA or PyTorch headers),
// so csrc/ops.cpp can call them from a translation unit g++ compiles.
//
// All pointers are device pointers to contiguous tensors; `stream` is the cudaStream_t of the
// current device. The launchers enqueue their kernels and return without waiting: nullptr on
// success, else the CUDA error text of the launch (a static string).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "cuda/dtype.h"

namespace streamssl {
namespace cuda {

struct DwconvLnProblem {
  int64_t B, T, C;
  int K;
  Dtype x_dtype;       // x, cache, y, new_cache, grad_y, grad_x
  Dtype weight_dtype;  // each parameter: x's dtype or float32 (float64 when x is)
  Dtype bias_dtype;    // ignored without bias
  Dtype ln_weight_dtype;
  Dtype ln_bias_dtype;
};

// Largest C the CUDA kernels take (a row lives in the registers of one thread block).
int64_t dwconv_ln_max_channels(Dtype x_dtype);

// Bytes of device workspace the forward / backward need (the caller allocates them, 16-byte
// aligned, e.g. as a uint8 tensor from the caching allocator).
size_t dwconv_ln_forward_workspace_bytes(const DwconvLnProblem& p);
size_t dwconv_ln_backward_workspace_bytes(const DwconvLnProblem& p);

// y (B, T, C) and new_cache (B, K-1, C) in x's dtype; mean, rstd (B, T) float32 (float64 for
// float64 x). bias and cache may be null (zeros).
const char* launch_causal_dwconv_ln_forward(const DwconvLnProblem& p, const void* x,
                                            const void* weight, const void* bias,
                                            const void* ln_weight, const void* ln_bias,
                                            const void* cache, double eps, bool swish, void* y,
                                            void* new_cache, void* mean, void* rstd,
                                            void* workspace, void* stream);

// grad_x in x's dtype; grad_weight (C, K), grad_bias, grad_ln_weight, grad_ln_bias (C,) each in
// its parameter's dtype (grad_bias in weight's dtype when there is no bias).
const char* launch_causal_dwconv_ln_backward(const DwconvLnProblem& p, const void* grad_y,
                                             const void* x, const void* weight, const void* bias,
                                             const void* ln_weight, const void* ln_bias,
                                             const void* cache, const void* mean, const void* rstd,
                                             bool swish, void* grad_x, void* grad_weight,
                                             void* grad_bias, void* grad_ln_weight,
                                             void* grad_ln_bias, void* workspace, void* stream);

}  // namespace cuda
}  // namespace streamssl
