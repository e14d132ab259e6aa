// The counter-based dropout rule, written once for the CPU kernel, the CUDA kernel and the CUDA
// emulator tests; streamssl/ops/reference.py is the same rule in PyTorch and the three agree bit
// for bit.
//
// Element n of the (row-major) input keeps its value, scaled by 1 / (1 - p), iff its Philox word
// w(n) satisfies w(n) * 2^-32 >= p, i.e. w(n) >= ceil(p * 2^32); otherwise it is multiplied by 0
// (so NaN and Inf still propagate, as with a multiplicative mask). Words come in groups of 32
// elements served by 8 Philox blocks: element n = 32 g + 8 j + l takes word j of block 8 g + l,
// whose counter is (block mod 2^32, block div 2^32, 0, 0) under the key (seed mod 2^32,
// seed div 2^32). That layout lets 8 SIMD lanes or 8 CUDA threads each run one block and write
// 4 runs of 8 contiguous elements, with no transpose. Because the mask is a pure function of
// (seed, n), the backward regenerates it instead of storing it: the gradient is the same op
// applied to the incoming gradient with the same seed.
#pragma once
#include <math.h>
#include <stdint.h>

#include "macros.h"
#include "philox.h"

namespace streamssl {

constexpr int64_t kDropoutGroup = 32;        // elements per group
constexpr int64_t kDropoutBlocksPerGroup = 8;  // Philox blocks per group (4 words each)

struct DropoutRule {
  uint32_t key0, key1;  // seed mod 2^32, seed >> 32
  uint32_t threshold;   // keep iff word >= threshold
  double scale;         // factor of a kept element: 1 / (1 - p), or 0 when nothing can be kept

  // The four words of Philox block `block` (words j = 0..3 serve elements 32 g + 8 j + l).
  STREAMSSL_HD Philox4x32 block_words(int64_t block) const {
    const uint64_t b = static_cast<uint64_t>(block);
    return philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), 0u, 0u, key0,
                         key1);
  }
  // Philox block and word index of element n.
  STREAMSSL_HD static int64_t block_of(int64_t n) {
    return (n / kDropoutGroup) * kDropoutBlocksPerGroup + n % kDropoutBlocksPerGroup;
  }
  STREAMSSL_HD static int word_of(int64_t n) {
    return static_cast<int>((n % kDropoutGroup) / kDropoutBlocksPerGroup);
  }
  STREAMSSL_HD bool keeps(uint32_t word) const { return word >= threshold; }
  // Whether element n is kept (the scalar form; kernels batch the Philox calls instead).
  STREAMSSL_HD bool keeps_element(int64_t n) const {
    return keeps(block_words(block_of(n)).v[word_of(n)]);
  }
};

// The rule for drop probability p in [0, 1) (ops.cpp checks) and a 64-bit seed. ceil(p * 2^32) is
// exact in float64 (a power-of-two scaling); it reaches 2^32 only for p > 1 - 2^-32, where no word
// is large enough and every element is dropped.
STREAMSSL_HD DropoutRule make_dropout_rule(double p, int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  DropoutRule r;
  r.key0 = static_cast<uint32_t>(s);
  r.key1 = static_cast<uint32_t>(s >> 32);
  const double t = ceil(p * 4294967296.0);
  if (t >= 4294967296.0) {
    r.threshold = 0xFFFFFFFFu;
    r.scale = 0.0;
  } else {
    r.threshold = static_cast<uint32_t>(t);
    r.scale = 1.0 / (1.0 - p);
  }
  return r;
}

}  // namespace streamssl
