// CPU kernel of the counter-based dropout (csrc/common/dropout_rule.h); arguments are validated
// by ops.cpp before it is called.
#pragma once
#include <ATen/ATen.h>

#include "common/dropout_rule.h"

namespace streamssl {
namespace cpu {

// x contiguous (float32, float64, float16 or bfloat16), y preallocated, contiguous, same dtype and
// size: y[n] = x[n] * (kept(n) ? 1 / (1 - p) : 0), the product in float for the 16-bit types.
// The same bits for every thread count and instruction set.
void dropout(const at::Tensor& x, const DropoutRule& rule, at::Tensor& y);

}  // namespace cpu
}  // namespace streamssl
