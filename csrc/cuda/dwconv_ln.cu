// Launchers of the causal_dwconv_ln CUDA kernels: the launch sequences of dwconv_ln.cuh with a
// policy that launches with <<<>>> on the caller's stream, dispatched on x's dtype. No PyTorch
// headers.
#include <cuda_runtime.h>

#include "cuda/dwconv_ln.cuh"
#include "cuda/dwconv_ln_launch.h"
#include "cuda/launch_config.h"

namespace streamssl {
namespace cuda {
namespace k = dwconv_ln_kernels;

int64_t dwconv_ln_max_channels(Dtype) { return k::kMaxChannels; }

size_t dwconv_ln_forward_workspace_bytes(const DwconvLnProblem& p) {
  return k::workspace_layout(p.B, p.T, p.C, p.K, static_cast<int>(p.x_dtype), false).total;
}

size_t dwconv_ln_backward_workspace_bytes(const DwconvLnProblem& p) {
  return k::workspace_layout(p.B, p.T, p.C, p.K, static_cast<int>(p.x_dtype), true).total;
}

const char* launch_causal_dwconv_ln_forward(const DwconvLnProblem& p, const void* x,
                                            const void* weight, const void* bias,
                                            const void* ln_weight, const void* ln_bias,
                                            const void* cache, double eps, bool swish, void* y,
                                            void* new_cache, void* mean, void* rstd,
                                            void* workspace, void* stream) {
  const StreamLaunch launch{static_cast<cudaStream_t>(stream)};
  int rc;
  switch (p.x_dtype) {
    case Dtype::kFloat16:
      rc = k::run_forward<__half, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                         new_cache, mean, rstd, workspace, launch);
      break;
    case Dtype::kBFloat16:
      rc = k::run_forward<__nv_bfloat16, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish,
                                                y, new_cache, mean, rstd, workspace, launch);
      break;
    case Dtype::kFloat64:
      rc = k::run_forward<double, double>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                          new_cache, mean, rstd, workspace, launch);
      break;
    default:
      rc = k::run_forward<float, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                        new_cache, mean, rstd, workspace, launch);
  }
  return launch_status(rc, "no kernel for this row width");
}

const char* launch_causal_dwconv_ln_backward(const DwconvLnProblem& p, const void* grad_y,
                                             const void* x, const void* weight, const void* bias,
                                             const void* ln_weight, const void* ln_bias,
                                             const void* cache, const void* mean, const void* rstd,
                                             bool swish, void* grad_x, void* grad_weight,
                                             void* grad_bias, void* grad_ln_weight,
                                             void* grad_ln_bias, void* workspace, void* stream) {
  const StreamLaunch launch{static_cast<cudaStream_t>(stream)};
  int rc;
  switch (p.x_dtype) {
    case Dtype::kFloat16:
      rc = k::run_backward<__half, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                          swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                          grad_ln_bias, workspace, launch);
      break;
    case Dtype::kBFloat16:
      rc = k::run_backward<__nv_bfloat16, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean,
                                                 rstd, swish, grad_x, grad_weight, grad_bias,
                                                 grad_ln_weight, grad_ln_bias, workspace, launch);
      break;
    case Dtype::kFloat64:
      rc = k::run_backward<double, double>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                           swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                           grad_ln_bias, workspace, launch);
      break;
    default:
      rc = k::run_backward<float, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                         swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                         grad_ln_bias, workspace, launch);
  }
  return launch_status(rc, "no kernel for this row width");
}

}  // namespace cuda
}  // namespace streamssl
