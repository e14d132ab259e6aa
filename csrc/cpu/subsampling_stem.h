// CPU kernel of subsampling_stem_backward; arguments are validated by ops.cpp before it is called.
#pragma once
#include <ATen/ATen.h>

namespace streamssl {
namespace cpu {

// grad_y1 (B, T1, F1, C), y0 (B, T0, F0, C), feats (B, T, F), w1 (C, 3, 3): contiguous, one
// floating dtype (float32 or float64), sizes as common/subsampling_stem_math.h derives them from
// (B, T, F, C, pad). Writes grad_w0 (C, 3, 3), grad_b0 (C,), grad_w1 (C, 3, 3) in that dtype.
// Sums run over fixed tiles of stage-0 frames in a fixed order: the same bits on every run and
// for every thread count.
void subsampling_stem_backward(const at::Tensor& grad_y1, const at::Tensor& y0,
                               const at::Tensor& feats, const at::Tensor& w1, int64_t pad,
                               at::Tensor& grad_w0, at::Tensor& grad_b0, at::Tensor& grad_w1);

}  // namespace cpu
}  // namespace streamssl
