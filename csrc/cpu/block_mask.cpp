#include "cpu/block_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace streamssl {
namespace cpu {

void causal_block_mask(const at::Tensor& feats, const at::Tensor& lengths,
                       const at::Tensor& mask_embedding, const BlockMaskRule& rule,
                       at::Tensor& masked, at::Tensor& mask) {
  const int64_t B = feats.size(0), T = feats.size(1), F = feats.size(2);
  const int64_t* len = lengths.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();

  // Scan: one utterance per task (the rule is sequential within an utterance).
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      bool* row = m + b * T;
      std::memset(row, 0, static_cast<size_t>(T) * sizeof(bool));
      const int64_t L = std::min(std::max<int64_t>(len[b], 0), T);
      scan_block_mask(rule, b, L, row);
    }
  });

  // Write: each (b, t) row is a copy of either the input row or the embedding, so it runs at
  // memory speed; grain ~64 KiB of output per task.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "causal_block_mask_cpu", [&] {
    const scalar_t* x = feats.data_ptr<scalar_t>();
    const scalar_t* emb = mask_embedding.data_ptr<scalar_t>();
    scalar_t* y = masked.data_ptr<scalar_t>();
    const size_t row_bytes = static_cast<size_t>(F) * sizeof(scalar_t);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, static_cast<int64_t>(row_bytes)));
    at::parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::memcpy(y + r * F, m[r] ? emb : x + r * F, row_bytes);
      }
    });
  });
}

}  // namespace cpu
}  // namespace streamssl
