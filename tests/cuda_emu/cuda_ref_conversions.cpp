// Reference conversions from NVIDIA's own cuda_fp16.h / cuda_bf16.h (their host implementations),
// built with g++ against the CUDA toolkit headers (no emulator), to check the emulator's __half
// and __nv_bfloat16 conversions bit for bit. kind: 0 half, 1 bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#define REF_API extern "C" __attribute__((visibility("default")))

REF_API void ref_16bit_to_float(const uint16_t* x, float* y, int64_t n, int kind) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = kind == 0 ? __half2float(__ushort_as_half(x[i])) : __bfloat162float(__ushort_as_bfloat16(x[i]));
}

REF_API void ref_float_to_16bit(const float* x, uint16_t* y, int64_t n, int kind) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = kind == 0 ? __half_as_ushort(__float2half_rn(x[i])) : __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

REF_API void ref_double_to_16bit(const double* x, uint16_t* y, int64_t n, int kind) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = kind == 0 ? __half_as_ushort(__double2half(x[i])) : __bfloat16_as_ushort(__double2bfloat16(x[i]));
}
