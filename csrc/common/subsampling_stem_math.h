// The subsampling stem's fused backward: index rules and per-element math, shared by the CPU
// kernel (csrc/cpu/subsampling_stem.cpp), the CUDA kernels (csrc/cuda/subsampling_stem.cuh) and
// the CUDA emulator.
//
// The stem is the first two stages of the causal striding subsampling, channels last:
//   y0 = relu(conv3x3_s2(feats, w0) + b0) * keep     (B, T0, F0, C)   1 -> C channels
//   y1 = depthwise_conv3x3_s2(y0, w1) + b1           (B, T1, F1, C)
// with `pad` zero frames on both sides of time and one zero bin on both sides of frequency; keep
// zeroes the stage-0 frames at or past each utterance's stage-0 length.
//
// The forward is PyTorch's (its convolution, ReLU and mask already run at the memory floor of
// writing y0). Backward: given grad_y1, only the parameter gradients are needed (the features
// take none):
//   g0[b,i,j,c]      = (y0 > 0) * sum over taps (kt,kf) feeding y1[b,o,p]: w1[c,kt,kf] grad_y1[b,o,p,c]
//   grad_w1[c,kt,kf] = sum_{b,o,p} y0[b, 2o+kt-pad, 2p+kf-1, c] grad_y1[b,o,p,c]
//   grad_w0[c,kt,kf] = sum_{b,i,j} g0[b,i,j,c] feats[b, 2i+kt-pad, 2j+kf-1]
//   grad_b0[c]       = sum_{b,i,j} g0[b,i,j,c]
// One pass over y0 per stage-0 position (b, i, j) computes all of them: the (B, T0, F0, C)
// gradient of y0 is never written, which is what makes it cheaper than autograd's depthwise-conv
// backward + ReLU backward + stage-0 weight gradient, each a pass over that map. Since y0 is
// relu(.) * keep with keep in {0, 1}, y0 > 0 is exactly where the ReLU (and keep) pass the
// gradient.
#pragma once

#include <stdint.h>

#include "common/macros.h"

namespace streamssl {
namespace stem {

constexpr int kTaps = 9;  // 3 x 3
// Per-channel partial sums of a tile: grad_w0 (9 taps), grad_b0, grad_w1 (9 taps).
constexpr int kPartials = 2 * kTaps + 1;
constexpr int kGradW0 = 0, kGradB0 = kTaps, kGradW1 = kTaps + 1;

// Outputs of a 3-tap stride-2 convolution over n inputs padded with `pad` zeros on both sides.
STREAMSSL_HD int64_t out_size(int64_t n, int64_t pad) {
  return n + 2 * pad < 3 ? 0 : (n + 2 * pad - 3) / 2 + 1;
}

// The output o that input i feeds through tap k (2 o + k - pad == i), or -1 when none does.
STREAMSSL_HD int64_t fed_output(int64_t i, int k, int64_t pad, int64_t n_out) {
  const int64_t num = i + pad - k;
  if (num < 0 || (num & 1) != 0) return -1;
  const int64_t o = num >> 1;
  return o < n_out ? o : -1;
}

// The input that output o reads through tap k, or -1 in the zero padding.
STREAMSSL_HD int64_t read_input(int64_t o, int k, int64_t pad, int64_t n_in) {
  const int64_t i = 2 * o + k - pad;
  return (i >= 0 && i < n_in) ? i : -1;
}

// Calls visit(tap, o, q) for each stage-1 output (o, q) that reads stage-0 position (i, j), with
// the tap (kt * 3 + kf) it reads it through; returns whether there was any.
template <typename Visit>
STREAMSSL_HD bool for_each_reader(int64_t i, int64_t j, int64_t pad, int64_t T1, int64_t F1, Visit&& visit) {
  bool any = false;
  for (int kt = 0; kt < 3; ++kt) {
    const int64_t o = fed_output(i, kt, pad, T1);
    if (o < 0) continue;
    for (int kf = 0; kf < 3; ++kf) {
      const int64_t q = fed_output(j, kf, 1, F1);
      if (q < 0) continue;
      any = true;
      visit(kt * 3 + kf, o, q);
    }
  }
  return any;
}

// Calls visit(tap, t, f) for each input (t, f) that stage-0 position (i, j) reads through tap
// kt * 3 + kf and that is not zero padding.
template <typename Visit>
STREAMSSL_HD void for_each_input(int64_t i, int64_t j, int64_t pad, int64_t T, int64_t F, Visit&& visit) {
  for (int kt = 0; kt < 3; ++kt) {
    const int64_t t = read_input(i, kt, pad, T);
    if (t < 0) continue;
    for (int kf = 0; kf < 3; ++kf) {
      const int64_t f = read_input(j, kf, 1, F);
      if (f >= 0) visit(kt * 3 + kf, t, f);
    }
  }
}

// Stage 1's gradient reaching one y0 element through one tap, and that tap's weight gradient.
template <typename A>
STREAMSSL_HD void tap_update(A w1, A y0, A g1, A& g0_sum, A& grad_w1) {
  g0_sum += w1 * g1;
  grad_w1 += y0 * g1;
}

// The ReLU's backward at a stage-0 output: the gradient passes where the output is positive.
template <typename A>
STREAMSSL_HD A relu_gate(A g0_sum, A y0) {
  return y0 > A(0) ? g0_sum : A(0);
}

// Sizes of one problem (checked by csrc/ops.cpp before any kernel runs).
struct Shape {
  int64_t B, T, F, T0, F0, T1, F1, C, pad;
};

STREAMSSL_HD Shape make_shape(int64_t B, int64_t T, int64_t F, int64_t C, int64_t pad) {
  Shape s;
  s.B = B;
  s.T = T;
  s.F = F;
  s.C = C;
  s.pad = pad;
  s.T0 = out_size(T, pad);
  s.F0 = out_size(F, 1);
  s.T1 = out_size(s.T0, pad);
  s.F1 = out_size(s.F0, 1);
  return s;
}

}  // namespace stem
}  // namespace streamssl
