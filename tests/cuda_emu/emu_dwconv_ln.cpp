// Emulator bindings of the causal_dwconv_ln CUDA kernels (tests/test_cuda_emu_dwconv_ln.py calls
// them through ctypes). They run the launch sequences of csrc/cuda/dwconv_ln.cuh -- the same ones
// dwconv_ln.cu runs with <<<>>> -- with a policy that launches on the emulator.
#include "cuda_emu.h"  // first: defines STREAMSSL_CUDA_EMU and the CUDA built-ins
#include "cuda/dwconv_ln.cuh"
#include "emu_launch.h"

namespace k = streamssl::cuda::dwconv_ln_kernels;
using streamssl::cuda::Dtype;
using streamssl::cuda::DwconvLnProblem;

namespace {

bool valid_dtype(int64_t d) { return d >= 0 && d <= 3; }

int make_problem(int64_t B, int64_t T, int64_t C, int64_t K, int64_t x_dtype, int64_t w_dtype,
                 int64_t b_dtype, int64_t lw_dtype, int64_t lb_dtype, DwconvLnProblem* p) {
  if (B < 0 || T < 0 || C < 1 || C > k::kMaxChannels || K < 1) {
    return cuda_emu::invalid_argument("bad shape B=%lld T=%lld C=%lld K=%lld", (long long)B,
                                      (long long)T, (long long)C, (long long)K);
  }
  for (int64_t d : {x_dtype, w_dtype, b_dtype, lw_dtype, lb_dtype}) {
    if (!valid_dtype(d)) return cuda_emu::invalid_argument("dtype code must be in [0, 3], got %lld", (long long)d);
  }
  p->B = B;
  p->T = T;
  p->C = C;
  p->K = static_cast<int>(K);
  p->x_dtype = static_cast<Dtype>(x_dtype);
  p->weight_dtype = static_cast<Dtype>(w_dtype);
  p->bias_dtype = static_cast<Dtype>(b_dtype);
  p->ln_weight_dtype = static_cast<Dtype>(lw_dtype);
  p->ln_bias_dtype = static_cast<Dtype>(lb_dtype);
  return 0;
}

}  // namespace

// Workspace bytes the forward (backward = 0) or backward needs.
CUDA_EMU_BINDING(emu_dwconv_ln_workspace_bytes, int64_t B, int64_t T, int64_t C, int64_t K, int64_t x_dtype,
                 int64_t backward, int64_t* out) {
  if (!valid_dtype(x_dtype)) return cuda_emu::invalid_argument("bad dtype %lld", (long long)x_dtype);
  *out = static_cast<int64_t>(k::workspace_layout(B, T, C, static_cast<int>(K), static_cast<int>(x_dtype),
                                                  backward != 0).total);
  return 0;
}

// Whether the row kernels would use 16-byte accesses for these rows (k::rows_vec_ok).
CUDA_EMU_BINDING(emu_dwconv_ln_rows_vec_ok, const void* x, const void* cache, const void* out, int64_t C,
                 int64_t x_dtype, int64_t* vec_ok) {
  if (!valid_dtype(x_dtype)) return cuda_emu::invalid_argument("bad dtype %lld", (long long)x_dtype);
  *vec_ok = k::rows_vec_ok(static_cast<int>(x_dtype), C, x, cache, out) ? 1 : 0;
  return 0;
}

CUDA_EMU_BINDING(emu_dwconv_ln_forward, const void* x, const void* weight, const void* bias, const void* ln_weight,
                 const void* ln_bias, const void* cache, int64_t B, int64_t T, int64_t C, int64_t K,
                 int64_t x_dtype, int64_t w_dtype, int64_t b_dtype, int64_t lw_dtype, int64_t lb_dtype, double eps,
                 int64_t swish, void* y, void* new_cache, void* mean, void* rstd, void* workspace) {
  DwconvLnProblem p;
  if (int rc = make_problem(B, T, C, K, x_dtype, w_dtype, b_dtype, lw_dtype, lb_dtype, &p)) return rc;
  const EmuLaunch launch;
  switch (p.x_dtype) {
    case Dtype::kFloat16:
      return k::run_forward<__half, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish != 0, y,
                                           new_cache, mean, rstd, workspace, launch);
    case Dtype::kBFloat16:
      return k::run_forward<__nv_bfloat16, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish != 0,
                                                  y, new_cache, mean, rstd, workspace, launch);
    case Dtype::kFloat64:
      return k::run_forward<double, double>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish != 0, y,
                                            new_cache, mean, rstd, workspace, launch);
    default:
      return k::run_forward<float, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish != 0, y,
                                          new_cache, mean, rstd, workspace, launch);
  }
}

CUDA_EMU_BINDING(emu_dwconv_ln_backward, const void* grad_y, const void* x, const void* weight, const void* bias,
                 const void* ln_weight, const void* ln_bias, const void* cache, const void* mean, const void* rstd,
                 int64_t B, int64_t T, int64_t C, int64_t K, int64_t x_dtype, int64_t w_dtype, int64_t b_dtype,
                 int64_t lw_dtype, int64_t lb_dtype, int64_t swish, void* grad_x, void* grad_weight,
                 void* grad_bias, void* grad_ln_weight, void* grad_ln_bias, void* workspace) {
  DwconvLnProblem p;
  if (int rc = make_problem(B, T, C, K, x_dtype, w_dtype, b_dtype, lw_dtype, lb_dtype, &p)) return rc;
  const EmuLaunch launch;
  const bool sw = swish != 0;
  switch (p.x_dtype) {
    case Dtype::kFloat16:
      return k::run_backward<__half, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd, sw,
                                            grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias,
                                            workspace, launch);
    case Dtype::kBFloat16:
      return k::run_backward<__nv_bfloat16, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean,
                                                   rstd, sw, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                                   grad_ln_bias, workspace, launch);
    case Dtype::kFloat64:
      return k::run_backward<double, double>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd, sw,
                                             grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias,
                                             workspace, launch);
    default:
      return k::run_backward<float, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd, sw,
                                           grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias,
                                           workspace, launch);
  }
}
