// CPU kernel of subsampling_stem_backward; arguments are validated by ops.cpp before it is called.
#pragma once
#include <ATen/ATen.h>

namespace streamssl {
namespace cpu {

// feats (B, T, F), w0 (C, 3, 3), b0 (C,): contiguous, one floating dtype (float32 or float64);
// lengths0 (B,) int64, the valid stage-0 frames of each row. Writes y0 (B, T0, F0, C) =
// relu(conv3x3_s2(feats, w0) + b0), zero from frame lengths0[b] on.
void subsampling_stem_forward(const at::Tensor& feats, const at::Tensor& w0, const at::Tensor& b0,
                              const at::Tensor& lengths0, int64_t pad, at::Tensor& y0);

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
