// Launchers of the causal_dwconv_ln CUDA kernels: the launch sequences of dwconv_ln.cuh with a
// policy that launches with <<<>>> on the caller's stream, dispatched on x's dtype. No PyTorch
// headers.
#include <cuda_runtime.h>

#include "cuda/dwconv_ln.cuh"
#include "cuda/dwconv_ln_launch.h"

namespace streamssl {
namespace cuda {
namespace {

namespace k = dwconv_ln_kernels;

struct StreamLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename Args>
  int operator()(Kernel kernel, const k::LaunchConfig& c, const Args& args) const {
    kernel<<<c.grid, c.block, c.smem, stream>>>(args);
    return cudaPeekAtLastError() == cudaSuccess ? 0 : 1;
  }
};

const char* status(int rc) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return rc == 0 ? nullptr : "no kernel for this row width";
}

}  // namespace

int64_t dwconv_ln_max_channels(DwconvLnDtype) { return k::kMaxChannels; }

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
    case DwconvLnDtype::kFloat16:
      rc = k::run_forward<__half, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                         new_cache, mean, rstd, workspace, launch);
      break;
    case DwconvLnDtype::kBFloat16:
      rc = k::run_forward<__nv_bfloat16, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish,
                                                y, new_cache, mean, rstd, workspace, launch);
      break;
    case DwconvLnDtype::kFloat64:
      rc = k::run_forward<double, double>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                          new_cache, mean, rstd, workspace, launch);
      break;
    default:
      rc = k::run_forward<float, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                        new_cache, mean, rstd, workspace, launch);
  }
  return status(rc);
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
    case DwconvLnDtype::kFloat16:
      rc = k::run_backward<__half, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                          swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                          grad_ln_bias, workspace, launch);
      break;
    case DwconvLnDtype::kBFloat16:
      rc = k::run_backward<__nv_bfloat16, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean,
                                                 rstd, swish, grad_x, grad_weight, grad_bias,
                                                 grad_ln_weight, grad_ln_bias, workspace, launch);
      break;
    case DwconvLnDtype::kFloat64:
      rc = k::run_backward<double, double>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                           swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                           grad_ln_bias, workspace, launch);
      break;
    default:
      rc = k::run_backward<float, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                         swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                         grad_ln_bias, workspace, launch);
  }
  return status(rc);
}

}  // namespace cuda
}  // namespace streamssl
