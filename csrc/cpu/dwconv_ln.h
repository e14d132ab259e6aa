// CPU kernels of causal_dwconv_ln; arguments are validated by ops.cpp before they are called.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace streamssl {
namespace cpu {

// x (B, T, C) contiguous; weight (C, K); bias, ln_weight, ln_bias (C,); cache (B, K-1, C) or none;
// parameters in x's dtype or float32/float64 (they are read in the accumulation type).
// Writes y (B, T, C) and new_cache (B, K-1, C) in x's dtype, and the LayerNorm statistics
// mean, rstd (B, T) in the accumulation type (float64 for float64 x, float32 otherwise).
void causal_dwconv_ln_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                              const at::Tensor& ln_bias, const std::optional<at::Tensor>& cache,
                              double eps, bool swish, at::Tensor& y, at::Tensor& new_cache,
                              at::Tensor& mean, at::Tensor& rstd);

// grad_y (B, T, C) in x's dtype; mean, rstd as the forward returned them. Recomputes the conv
// output, writes grad_x (x's dtype) and the parameter gradients (each in its parameter's dtype;
// grad_bias in weight's dtype when there is no bias). The parameter gradients are reduced over
// fixed time tiles in a fixed order: the same bits on every run and for every thread count.
void causal_dwconv_ln_backward(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                               const std::optional<at::Tensor>& cache, const at::Tensor& mean,
                               const at::Tensor& rstd, bool swish, at::Tensor& grad_x,
                               at::Tensor& grad_weight, at::Tensor& grad_bias,
                               at::Tensor& grad_ln_weight, at::Tensor& grad_ln_bias);

}  // namespace cpu
}  // namespace streamssl
