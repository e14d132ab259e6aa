// Portability macros shared by the CPU kernels, the CUDA kernels and the CUDA emulator
// (tests/cuda_emu). Everything in csrc/common is header-only and free of PyTorch headers so that
// the same math compiles under g++, nvcc and the emulator.
#pragma once

#if defined(__CUDACC__)
// nvcc: real device code.
#define STREAMSSL_HD __host__ __device__ __forceinline__
#define STREAMSSL_DEVICE __device__ __forceinline__
#define STREAMSSL_RESTRICT __restrict__
// Dynamic shared memory has one spelling on the GPU and another under the emulator, where
// `__shared__` is `static` (blocks run one after another) and `extern static` is not C++.
#define STREAMSSL_EXTERN_SHARED(type, name) extern __shared__ type name[]
#elif defined(STREAMSSL_CUDA_EMU)
// tests/cuda_emu/cuda_emu.h defines the CUDA built-ins and cuda_emu::dynamic_smem().
#define STREAMSSL_HD inline
#define STREAMSSL_DEVICE inline
#define STREAMSSL_RESTRICT __restrict__
#define STREAMSSL_EXTERN_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::cuda_emu::dynamic_smem())
#else
// Plain host C++ (CPU kernels, C++ unit tests).
#define STREAMSSL_HD inline
#define STREAMSSL_DEVICE inline
#define STREAMSSL_RESTRICT __restrict__
#endif
