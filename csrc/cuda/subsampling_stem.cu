// Launcher of the subsampling stem's fused-backward CUDA kernels: the launch sequence of
// subsampling_stem.cuh with a policy that launches with <<<>>> on the caller's stream. No
// PyTorch headers.
#include <cuda_runtime.h>

#include "cuda/subsampling_stem.cuh"
#include "cuda/subsampling_stem_launch.h"
#include "cuda/launch_config.h"

namespace streamssl {
namespace cuda {
namespace k = subsampling_stem_kernels;

size_t subsampling_stem_workspace_bytes(const StemProblem& p) { return k::workspace_bytes(p); }

const char* launch_subsampling_stem_backward(const StemProblem& p, const void* grad_y1,
                                             const void* y0, const void* feats, const void* w1,
                                             void* grad_w0, void* grad_b0, void* grad_w1,
                                             void* workspace, void* stream) {
  const StreamLaunch launch{static_cast<cudaStream_t>(stream)};
  const int rc = p.float64
                     ? k::run_backward<double>(p, grad_y1, y0, feats, w1, grad_w0, grad_b0, grad_w1, workspace, launch)
                     : k::run_backward<float>(p, grad_y1, y0, feats, w1, grad_w0, grad_b0, grad_w1, workspace, launch);
  return launch_status(rc, "kernel launch failed");
}

}  // namespace cuda
}  // namespace streamssl
