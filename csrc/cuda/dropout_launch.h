// Host entry point of the counter-based dropout's CUDA kernel: plain C++ (no CUDA or PyTorch
// headers), so csrc/ops.cpp can call it from a translation unit g++ compiles.
#pragma once
#include <stdint.h>

#include "cuda/dtype.h"

#include "common/dropout_rule.h"

namespace streamssl {
namespace cuda {


// y[n] = x[n] * (kept(n) ? 1 / (1 - p) : 0) for the n elements of the contiguous device arrays x
// and y (same dtype, not overlapping). Enqueued on `stream` (the cudaStream_t of the current device)
// without waiting: nullptr on success, else the CUDA error text (a static string).
const char* launch_dropout(const void* x, void* y, int64_t n, Dtype dtype,
                           const DropoutRule& rule, void* stream);

}  // namespace cuda
}  // namespace streamssl
