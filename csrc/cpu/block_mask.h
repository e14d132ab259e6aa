// CPU kernel of causal_block_mask; arguments are validated by ops.cpp before it is called.
#pragma once
#include <ATen/ATen.h>

#include "common/block_mask_rule.h"

namespace streamssl {
namespace cpu {

// feats (B, T, F) contiguous, lengths (B,) int64 contiguous (values clamped to [0, T]),
// mask_embedding (F,) contiguous in feats' dtype. Writes masked (B, T, F) and mask (B, T) bool,
// both contiguous and preallocated. Any dtype works: the output rows are bit copies.
void causal_block_mask(const at::Tensor& feats, const at::Tensor& lengths,
                       const at::Tensor& mask_embedding, const BlockMaskRule& rule,
                       at::Tensor& masked, at::Tensor& mask);

}  // namespace cpu
}  // namespace streamssl
