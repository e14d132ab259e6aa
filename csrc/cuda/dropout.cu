// Launcher of the counter-based dropout's CUDA kernel: the launch sequence of dropout.cuh with a
// policy that launches with <<<>>> on the caller's stream. No PyTorch headers.
#include <cuda_runtime.h>

#include "cuda/dropout.cuh"
#include "cuda/dropout_launch.h"
#include "cuda/launch_config.h"

namespace streamssl {
namespace cuda {

const char* launch_dropout(const void* x, void* y, int64_t n, Dtype dtype,
                           const DropoutRule& rule, void* stream) {
  const StreamLaunch launch{static_cast<cudaStream_t>(stream)};
  const int rc = dropout_kernels::run_dropout_any(x, y, n, dtype, rule, launch);
  return launch_status(rc, "kernel launch failed");
}

}  // namespace cuda
}  // namespace streamssl
