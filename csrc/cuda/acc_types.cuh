// Element access in the accumulation type shared by the CUDA kernels: float for float32, float16
// and bfloat16 (round to nearest even on the way back), double for float64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/macros.h"

namespace streamssl {
namespace cuda {

STREAMSSL_DEVICE float to_acc(float v) { return v; }
STREAMSSL_DEVICE double to_acc(double v) { return v; }
STREAMSSL_DEVICE float to_acc(__half v) { return __half2float(v); }
STREAMSSL_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S>
STREAMSSL_DEVICE S from_acc(float v);
template <>
STREAMSSL_DEVICE float from_acc<float>(float v) {
  return v;
}
template <>
STREAMSSL_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
STREAMSSL_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename S>
STREAMSSL_DEVICE S from_acc(double v) {
  return v;
}

}  // namespace cuda
}  // namespace streamssl
