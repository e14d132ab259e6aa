// Math of causal_dwconv_ln shared by the CPU kernels (csrc/cpu/dwconv_ln.cpp), the CUDA kernels
// (csrc/cuda/dwconv_ln.cuh) and the CUDA emulator: the causal tap rule, the tap loop, LayerNorm
// finishing, Swish and its derivative. Free of PyTorch headers (see common/macros.h).
//
// Notation (docs/ARCHITECTURE.md, "The two fused ops"): xp = cat(cache, x) on time, K taps,
//   z[t, c]  = bias[c] + sum_j w[c, j] * xp[t + j, c]          (j = 0 .. K-1, in that order)
//   xhat     = (z - mean_c z) * rstd,  rstd = 1 / sqrt(var_c z + eps)   (biased variance)
//   h        = xhat * gamma + beta,    y = swish(h) = h * sigmoid(h)  (or y = h)
// Backward, with g = dL/dh * gamma:
//   dz = rstd * (g - mean_c g - xhat * mean_c(g * xhat))
//   dx[s] = sum_j w[j] * dz[s + K-1 - j] (dz = 0 beyond T),  dw[c, j] = sum_t dz[t, c] xp[t + j, c]
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace streamssl {
namespace dwconv_ln {

// Accumulation type: float64 for float64 inputs, float32 for everything else.
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---------------------------------------------------------------------------------------------
// Causal taps. Tap j of output row t reads xp row t + j: a cache row while t + j < K - 1, an x
// row after that. `cache_row` / `x_row` say which; the caller turns a cache row into zeros when
// there is no cache, so a first chunk without cache and a full sequence compute the same bits.
// ---------------------------------------------------------------------------------------------
struct TapSource {
  bool from_cache;
  int64_t row;  // row of the cache (0 .. K-2) or of x (0 .. T-1)
};

STREAMSSL_HD TapSource tap_source(int64_t t, int j, int K) {
  const int64_t i = t + j;  // row of xp
  TapSource s;
  s.from_cache = i < K - 1;
  s.row = s.from_cache ? i : i - (K - 1);
  return s;
}

// The tap loop: acc[l] += w(j, l) * x(j, l) for the taps j = 0 .. K-1 in that order (the order
// fixes the rounding, so every kernel sums taps the same way). acc holds N values of type V:
// N channels of a GPU thread (V = float), or N frames of a vector of channels on the CPU (V = a
// g++ vector). w(j, l) and x(j, l) return the tap-j weight and input for acc[l]. KC > 0 says that
// K == KC is known at compile time: the taps then unroll completely, and a compiler loads each
// weight and input once for all N accumulators even where several (j, l) share them.
template <int N, int KC = 0, typename V, typename WeightFn, typename InputFn>
STREAMSSL_HD void conv_taps(V (&acc)[N], int K, WeightFn&& w, InputFn&& x) {
  auto tap = [&](int j) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int l = 0; l < N; ++l) acc[l] += w(j, l) * x(j, l);
  };
  if constexpr (KC > 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 32
#endif
    for (int j = 0; j < KC; ++j) tap(j);
  } else {
    for (int j = 0; j < K; ++j) tap(j);
  }
}

// ---------------------------------------------------------------------------------------------
// exp for the sigmoid. float: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the classic
// degree-7 polynomial for e^r (about 1 ulp), scaled by 2^n through the exponent bits. Written
// without library calls or branches so that g++ vectorises it over channels and nvcc, g++ and
// the emulator all compute the same function. The argument is clamped to [-87, 87], where 2^n
// stays a normal float: sigmoid saturates long before, so only swish(h) for h < -87 (below
// 1e-36 in magnitude) differs from the exact value, by a negligible absolute amount. NaN is
// clamped too; swish(h) = h * sigmoid(h) and its derivative still propagate it through h.
// ---------------------------------------------------------------------------------------------
STREAMSSL_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

STREAMSSL_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}

STREAMSSL_HD float exp_acc(float x) {
  // |x| is clamped on the bit pattern: g++ vectorises integer min, but not float compares,
  // which may trap under its default -ftrapping-math.
  const int32_t bits = float_to_bits(x);
  const int32_t mag = bits & 0x7FFFFFFF;
  x = bits_to_float((bits & INT32_MIN) | (mag < 0x42AE0000 ? mag : 0x42AE0000));  // 87.0f
  // n = x log2(e) rounded to the nearest integer by adding 1.5 * 2^23: t's low mantissa bits
  // then hold n + 0x400000, which builds 2^n below without a float-to-int conversion.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;   // ln2's high part: n * C1 is exact
  r = r - n * -2.12194440e-4f;      // ln2's low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  return e * bits_to_float((float_to_bits(t) - (0x4B400000 - 127)) << 23);
}

STREAMSSL_HD double exp_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// Correctly rounded square roots of the accumulation type (IEEE on both sides, so the CPU and the
// GPU agree bit for bit on rstd given the same sums).
STREAMSSL_HD float sqrt_acc(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

STREAMSSL_HD double sqrt_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename A>
STREAMSSL_HD A sigmoid(A h) {
  return A(1) / (A(1) + exp_acc(-h));
}

// swish(h) = h * sigmoid(h)
template <typename A>
STREAMSSL_HD A swish(A h) {
  return h * sigmoid(h);
}

// d swish / dh = s + h s (1 - s) = s (1 + h (1 - s)),  s = sigmoid(h)
template <typename A>
STREAMSSL_HD A swish_grad(A h) {
  const A s = sigmoid(h);
  return s * (A(1) + h * (A(1) - s));
}

// ---------------------------------------------------------------------------------------------
// LayerNorm. Statistics are two-pass (sum, then the sum of squared deviations from the mean) over
// a row the caller keeps close (an L1 buffer on the CPU, registers on the GPU); these finish them.
// ---------------------------------------------------------------------------------------------
template <typename A>
STREAMSSL_HD A ln_mean(A sum, int64_t n) {
  return sum / static_cast<A>(n);
}

template <typename A>
STREAMSSL_HD A ln_rstd(A sum_sq_dev, int64_t n, A eps) {
  return A(1) / sqrt_acc(sum_sq_dev / static_cast<A>(n) + eps);
}

template <typename A>
STREAMSSL_HD A ln_xhat(A z, A mean, A rstd) {
  return (z - mean) * rstd;
}

// y of one element from its normalised value.
template <typename A>
STREAMSSL_HD A ln_act(A xhat, A gamma, A beta, bool use_swish) {
  const A h = xhat * gamma + beta;
  return use_swish ? swish(h) : h;
}

// dL/dh of one element: dy through the activation.
template <typename A>
STREAMSSL_HD A act_grad(A dy, A xhat, A gamma, A beta, bool use_swish) {
  return use_swish ? dy * swish_grad(xhat * gamma + beta) : dy;
}

// dL/dz of one element; g = dL/dh * gamma, mean_g and mean_gx are the row means of g and g * xhat.
template <typename A>
STREAMSSL_HD A ln_input_grad(A g, A xhat, A mean_g, A mean_gx, A rstd) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

}  // namespace dwconv_ln
}  // namespace streamssl
