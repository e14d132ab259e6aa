// A kernel launch as the .cuh launch sequences describe it, and the launch policy the .cu
// launchers pass them: the sequences are written once, over a policy `launch(kernel, config,
// args)` returning 0 on success; the .cu files launch with <<<>>> on a stream (StreamLaunch,
// which needs nvcc), the emulator bindings on the emulator (tests/cuda_emu/emu_launch.h).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

namespace streamssl {
namespace cuda {

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
};

#if defined(__CUDACC__)
struct StreamLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename Args>
  int operator()(Kernel kernel, const LaunchConfig& c, const Args& args) const {
    kernel<<<c.grid, c.block, c.smem, stream>>>(args);
    return cudaPeekAtLastError() == cudaSuccess ? 0 : 1;
  }
};

// nullptr after a successful sequence, else the CUDA error text or `failure` (both static).
inline const char* launch_status(int rc, const char* failure) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return rc == 0 ? nullptr : failure;
}
#endif

}  // namespace cuda
}  // namespace streamssl
