// The causal block-masking rule (docs/ARCHITECTURE.md, "The two fused ops"), written once for the CPU
// kernel, the CUDA kernel and the CUDA emulator tests. streamssl/ops/reference.py is the same rule
// in PyTorch; the three must agree bit for bit, so everything here is integer arithmetic or a
// single float64 operation (no fused multiply-add can change a result).
//
// Split of the work: a device decides *which* aligned frames draw a block start (Philox, fully
// parallel; `draws_start`, or `start_threshold` + `word_draws`, or a vectorised equivalent
// checked against them), then hands the drawn starts, in increasing order, to
// `BlockMaskScan::consider`, which applies the window cap. The scan touches the mask row only
// through a `Row` policy (count / fill), so the CPU walks a plain array while a CUDA warp counts
// and fills 32 frames per step; the arithmetic stays here.
#pragma once
#include <math.h>
#include <stdint.h>

#include "macros.h"
#include "philox.h"

namespace streamssl {

// Utterances have fewer frames than this (ops.cpp checks T < 2^31), so start, block and alignment
// parameters are clamped to it without changing any mask, and no frame arithmetic can overflow.
constexpr int64_t kBlockMaskMaxFrames = int64_t{1} << 31;

struct BlockMaskRule {
  uint32_t key0, key1;  // seed mod 2^32, seed >> 32
  uint32_t ctr0;        // offset mod 2^32
  double mask_prob;
  double max_mask_ratio;
  int64_t block_size;    // >= 1 (make_block_mask_rule clamps it to 2^31)
  int64_t min_start;     // >= 0: first frame that may start a block (clamped to 2^31)
  int64_t left_context;  // <= 0: the cap applies to the whole prefix
  int64_t align;         // >= 1 (clamped to 2^31)

  // Philox word of frame s of utterance b: counter (offset, b, s, 0), key (seed).
  STREAMSSL_HD uint32_t start_word(int64_t b, int64_t s) const {
    return philox4x32_10(ctr0, static_cast<uint32_t>(b), static_cast<uint32_t>(s), 0u, key0, key1)
        .v[0];
  }
  // Whether frame s of utterance b draws a block start (before the window cap is applied), as
  // the spec says it: u = (x >> 8) * 2^-24 compared with mask_prob in float64.
  STREAMSSL_HD bool draws_start(int64_t b, int64_t s) const {
    return philox_uniform24(start_word(b, s)) < mask_prob;
  }
  // The same test as one integer comparison, which vectorises and avoids float64 on GPUs:
  // u < mask_prob  iff  (x >> 8) < start_threshold() = ceil(mask_prob * 2^24), because
  // multiplying by a power of two is exact in float64 and, for an integer k and a real y,
  // k < y iff k < ceil(y). 0 means no frame draws, 2^24 every frame.
  STREAMSSL_HD uint32_t start_threshold() const {
    return static_cast<uint32_t>(ceil(mask_prob * 16777216.0));
  }
  STREAMSSL_HD static bool word_draws(uint32_t word, uint32_t threshold) {
    return (word >> 8) < threshold;
  }
  // First candidate frame: the smallest multiple of `align` that is >= min_start.
  STREAMSSL_HD int64_t first_start() const { return ((min_start + align - 1) / align) * align; }
  // Number of candidate frames below `length`.
  STREAMSSL_HD int64_t num_candidates(int64_t length) const {
    const int64_t first = first_start();
    return first < length ? (length - first + align - 1) / align : 0;
  }
  STREAMSSL_HD int64_t block_end(int64_t s, int64_t length) const {
    return s + block_size < length ? s + block_size : length;
  }
  // The window a block ending at e is judged in is [window_start(e), e).
  STREAMSSL_HD int64_t window_start(int64_t e) const {
    return (left_context > 0 && left_context < e) ? e - left_context : 0;
  }
  // Most masked frames a window of w frames may hold.
  STREAMSSL_HD int64_t window_cap(int64_t w) const {
    return static_cast<int64_t>(floor(max_mask_ratio * static_cast<double>(w)));
  }
};

// The rule for the op's arguments (already validated: probabilities in [0, 1], block_size >= 1,
// min_start >= 0, align >= 1). Clamping block_size, min_start and align to 2^31 changes no mask
// because every frame index is below T < 2^31.
STREAMSSL_HD BlockMaskRule make_block_mask_rule(int64_t seed, int64_t offset, double mask_prob,
                                                int64_t block_size, int64_t min_start,
                                                int64_t left_context, double max_mask_ratio,
                                                int64_t align) {
  const uint64_t s = static_cast<uint64_t>(seed);
  BlockMaskRule r;
  r.key0 = static_cast<uint32_t>(s);
  r.key1 = static_cast<uint32_t>(s >> 32);
  r.ctr0 = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  r.mask_prob = mask_prob;
  r.max_mask_ratio = max_mask_ratio;
  r.block_size = block_size < kBlockMaskMaxFrames ? block_size : kBlockMaskMaxFrames;
  r.min_start = min_start < kBlockMaskMaxFrames ? min_start : kBlockMaskMaxFrames;
  r.left_context = left_context;
  r.align = align < kBlockMaskMaxFrames ? align : kBlockMaskMaxFrames;
  return r;
}

// The valid length of utterance b: lengths[b] clamped to [0, T].
STREAMSSL_HD int64_t clamp_length(int64_t length, int64_t T) {
  return length < 0 ? 0 : (length > T ? T : length);
}

// The window-cap judgement over one utterance of `length` frames. Feed it the drawn starts in
// increasing order; it keeps the number of masked frames in a sliding window [lo, hi) of the mask
// row. Frames below a start s are final when s is judged (later blocks start later), so each
// frame enters and leaves the count once: O(length) work per utterance in all.
//
// Row policy (by value or reference, whatever is cheap):
//   int64_t count(int64_t a, int64_t b)  masked frames in [a, b) of the row (a <= b)
//   void fill(int64_t a, int64_t b)      mark [a, b) masked; visible to later count() calls
// On the GPU all 32 lanes of a warp call `consider` with the same arguments and cooperate inside
// count/fill, so the control flow here stays warp-uniform.
struct BlockMaskScan {
  int64_t lo = 0, hi = 0, settled = 0;  // settled = masked frames in [lo, hi)
  int64_t reach = 0;  // end of the accepted blocks so far: [s, reach) is masked for any later s

  template <typename Row>
  STREAMSSL_HD void consider(const BlockMaskRule& rule, int64_t s, int64_t length, Row& row) {
    const int64_t e = rule.block_end(s, length);
    const int64_t wlo = rule.window_start(e);  // non-decreasing in s, as e is
    if (hi < s) {
      settled += row.count(hi, s);
      hi = s;
    }
    const int64_t new_lo = wlo < s ? wlo : s;
    if (lo < new_lo) {
      settled -= row.count(lo, new_lo);
      lo = new_lo;
    }
    // After adding [s, e), the window holds the settled frames of [wlo, s) plus every frame of
    // [max(wlo, s), e) (earlier blocks reaching past s are inside that range already).
    const int64_t block_from = wlo > s ? wlo : s;
    if (settled + (e - block_from) <= rule.window_cap(e - wlo)) {
      // The block that set `reach` started before s, so [s, reach) is masked already; filling
      // only the rest keeps the work O(length) even when every frame starts a long block.
      if (reach < e) {
        row.fill(reach > s ? reach : s, e);
        reach = e;
      }
    }
  }
};

// A mask row in plain memory, visited by one thread (CPU kernel, C++ tests).
template <typename MaskT>
struct SerialMaskRow {
  MaskT* STREAMSSL_RESTRICT mask;
  STREAMSSL_HD int64_t count(int64_t a, int64_t b) const {
    int64_t n = 0;
    for (int64_t t = a; t < b; ++t) n += mask[t] ? 1 : 0;
    return n;
  }
  STREAMSSL_HD void fill(int64_t a, int64_t b) const {
    for (int64_t t = a; t < b; ++t) mask[t] = 1;
  }
};

// Sequential scan of one utterance with the scalar Philox draw, the rule at its plainest (the
// C++ unit tests compare it with a literal transcription of the rule in docs/ARCHITECTURE.md). `mask` (length >=
// `length`, zero on entry) receives 1 for masked frames.
template <typename MaskT>
STREAMSSL_HD void scan_block_mask(const BlockMaskRule& rule, int64_t b, int64_t length,
                                  MaskT* STREAMSSL_RESTRICT mask) {
  SerialMaskRow<MaskT> row{mask};
  BlockMaskScan scan;
  for (int64_t s = rule.first_start(); s < length; s += rule.align) {
    if (rule.draws_start(b, s)) scan.consider(rule, s, length, row);
  }
}

}  // namespace streamssl
