// The causal block-masking rule of DESIGN.md ("causal_block_mask"), written once for the CPU
// kernel, the CUDA kernel and the C++ unit tests. streamssl/ops/reference.py is the same rule in
// PyTorch; the three must agree bit for bit, so everything here is integer arithmetic or a single
// float64 operation (no fused multiply-add can change a result).
#pragma once
#include <math.h>
#include <stdint.h>

#include "macros.h"
#include "philox.h"

namespace streamssl {

struct BlockMaskRule {
  uint32_t key0, key1;  // seed mod 2^32, seed >> 32
  uint32_t ctr0;        // offset mod 2^32
  double mask_prob;
  double max_mask_ratio;
  int64_t block_size;    // >= 1
  int64_t min_start;     // first frame that may start a block
  int64_t left_context;  // <= 0: the cap applies to the whole prefix
  int64_t align;         // >= 1

  // Whether frame s of utterance b draws a block start (before the window cap is applied).
  STREAMSSL_HD bool draws_start(int64_t b, int64_t s) const {
    const Philox4x32 r = philox4x32_10(ctr0, static_cast<uint32_t>(b), static_cast<uint32_t>(s),
                                       0u, key0, key1);
    return philox_uniform24(r.v[0]) < mask_prob;
  }
  // First candidate frame: the smallest multiple of `align` that is >= max(min_start, 0).
  STREAMSSL_HD int64_t first_start() const {
    const int64_t m = min_start > 0 ? min_start : 0;
    return ((m + align - 1) / align) * align;
  }
  STREAMSSL_HD int64_t block_end(int64_t s, int64_t length) const {
    return s + block_size < length ? s + block_size : length;
  }
  // The window a block ending at e is judged in is [window_start(e), e).
  STREAMSSL_HD int64_t window_start(int64_t e) const {
    return (left_context > 0 && left_context < e) ? e - left_context : 0;
  }
  // Most masked frames a window of W frames may hold.
  STREAMSSL_HD int64_t window_cap(int64_t w) const {
    return static_cast<int64_t>(floor(max_mask_ratio * static_cast<double>(w)));
  }
};

// Sequential scan of one utterance: candidate starts in increasing order, each accepted iff the
// window cap holds after adding it. `mask` (length >= length, zero on entry) receives 1 for masked
// frames. Frames below a candidate start s are final when s is judged (later blocks start later),
// so one sliding count over the mask row replaces any per-block recount: O(length) in all.
template <typename MaskT>
STREAMSSL_HD void scan_block_mask(const BlockMaskRule& rule, int64_t b, int64_t length,
                                  MaskT* STREAMSSL_RESTRICT mask) {
  int64_t lo = 0, hi = 0, settled = 0;  // settled = masked frames in [lo, hi)
  for (int64_t s = rule.first_start(); s < length; s += rule.align) {
    if (!rule.draws_start(b, s)) continue;
    const int64_t e = rule.block_end(s, length);
    const int64_t wlo = rule.window_start(e);
    for (; hi < s; ++hi) settled += mask[hi] ? 1 : 0;
    const int64_t new_lo = wlo < s ? wlo : s;
    for (; lo < new_lo; ++lo) settled -= mask[lo] ? 1 : 0;
    const int64_t block_from = wlo > s ? wlo : s;
    if (settled + (e - block_from) <= rule.window_cap(e - wlo)) {
      for (int64_t t = s; t < e; ++t) mask[t] = 1;
    }
  }
}

}  // namespace streamssl
