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

// Candidate bits of 64 consecutive aligned frames s = s0 + i * rule.align (bit i set iff frame s
// draws a block start); only the first n <= 64 bits are computed, the others are zero. Uses AVX2
// Philox with the integer threshold where the CPU has it, and BlockMaskRule::draws_start (scalar
// Philox, float64 comparison) otherwise and for the n % 8 tail, so tests exercise both forms.
uint64_t candidate_bits(const BlockMaskRule& rule, int64_t b, int64_t s0, int n);

}  // namespace cpu
}  // namespace streamssl
