// Launchers of the causal_dwconv_ln CUDA kernels (csrc/cuda/dwconv_ln.cuh): dtype and width
// dispatch, triple-chevron launches on the caller's stream. No PyTorch headers.
#include <cuda_runtime.h>

#include "cuda/dwconv_ln.cuh"
#include "cuda/dwconv_ln_launch.h"

namespace streamssl {
namespace cuda {
namespace {

namespace k = dwconv_ln_kernels;

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename A>
void launch_pack(const DwconvLnProblem& p, const void* weight, const void* bias,
                 const void* ln_weight, const void* ln_bias, const void* x, const void* cache,
                 void* new_cache, A* out, cudaStream_t stream) {
  k::PackArgs<A> a;
  a.weight = weight;
  a.bias = bias;
  a.ln_weight = ln_weight;
  a.ln_bias = ln_bias;
  a.weight_dtype = static_cast<int>(p.weight_dtype);
  a.bias_dtype = static_cast<int>(p.bias_dtype);
  a.ln_weight_dtype = static_cast<int>(p.ln_weight_dtype);
  a.ln_bias_dtype = static_cast<int>(p.ln_bias_dtype);
  a.C = p.C;
  a.K = p.K;
  a.out = out;
  a.x = static_cast<const char*>(x);
  a.cache = static_cast<const char*>(cache);
  a.new_cache = static_cast<char*>(new_cache);
  a.B = p.B;
  a.T = p.T;
  a.elem_bytes = k::dtype_bytes(static_cast<int>(p.x_dtype));
  const int64_t n = (p.K + 3) * p.C + (new_cache ? p.B * (p.K - 1) * p.C : 0);
  const k::LaunchConfig cfg = k::flat_config(n);
  k::pack_kernel<A><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
}

template <typename S, typename A, int VEC>
void launch_forward_rows(const k::RowPlan& plan, const k::FwdArgs<S, A>& a, cudaStream_t stream) {
  const k::LaunchConfig cfg = k::row_config(plan);
  switch (plan.nch) {
    case 1:
      k::forward_kernel<S, A, VEC, 1><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    case 2:
      if constexpr (VEC <= 8) k::forward_kernel<S, A, VEC, 2><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    case 4:
      if constexpr (VEC <= 4) k::forward_kernel<S, A, VEC, 4><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    default:
      if constexpr (VEC <= 2) k::forward_kernel<S, A, VEC, 8><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
  }
}

template <typename S, typename A, int VEC>
void launch_backward_rows(const k::RowPlan& plan, const k::BwdArgs<S, A>& a, cudaStream_t stream) {
  const k::LaunchConfig cfg = k::row_config(plan);
  switch (plan.nch) {
    case 1:
      k::backward_row_kernel<S, A, VEC, 1><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    case 2:
      if constexpr (VEC <= 8) k::backward_row_kernel<S, A, VEC, 2><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    case 4:
      if constexpr (VEC <= 4) k::backward_row_kernel<S, A, VEC, 4><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
    default:
      if constexpr (VEC <= 2) k::backward_row_kernel<S, A, VEC, 8><<<cfg.grid, cfg.block, cfg.smem, stream>>>(a);
      break;
  }
}

template <typename S, typename A>
const char* forward_typed(const DwconvLnProblem& p, const void* x, const void* weight,
                          const void* bias, const void* ln_weight, const void* ln_bias,
                          const void* cache, double eps, bool swish, void* y, void* new_cache,
                          void* mean, void* rstd, void* workspace, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(S);
  A* params = reinterpret_cast<A*>(static_cast<char*>(workspace) +
                                   k::workspace_layout(p.B, p.T, p.C, p.K, static_cast<int>(p.x_dtype), false).params);
  launch_pack<A>(p, weight, bias, ln_weight, ln_bias, x, cache, p.K > 1 && p.B > 0 ? new_cache : nullptr,
                 params, stream);
  const int64_t rows = p.B * p.T;
  if (rows > 0) {
    const k::RowPlan plan = k::row_plan(rows, p.C, static_cast<int>(p.x_dtype), false);
    k::FwdArgs<S, A> a;
    a.x = static_cast<const S*>(x);
    a.cache = static_cast<const S*>(cache);
    a.params = params;
    a.y = static_cast<S*>(y);
    a.mean = static_cast<A*>(mean);
    a.rstd = static_cast<A*>(rstd);
    a.rows = rows;
    a.T = p.T;
    a.C = p.C;
    a.K = p.K;
    a.eps = static_cast<A>(eps);
    a.swish = swish;
    a.vec_ok = p.C % VEC == 0 && aligned16(x) && aligned16(cache) && aligned16(y);
    a.group_warps = plan.group_warps;
    a.groups_per_block = plan.groups_per_block;
    a.rows_per_group = plan.rows_per_group;
    launch_forward_rows<S, A, VEC>(plan, a, stream);
  }
  return last_error();
}

template <typename S, typename A>
const char* backward_typed(const DwconvLnProblem& p, const void* grad_y, const void* x,
                           const void* weight, const void* bias, const void* ln_weight,
                           const void* ln_bias, const void* cache, const void* mean,
                           const void* rstd, bool swish, void* grad_x, void* grad_weight,
                           void* grad_bias, void* grad_ln_weight, void* grad_ln_bias,
                           void* workspace, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(S);
  const k::Workspace ws = k::workspace_layout(p.B, p.T, p.C, p.K, static_cast<int>(p.x_dtype), true);
  char* base = static_cast<char*>(workspace);
  A* params = reinterpret_cast<A*>(base + ws.params);
  launch_pack<A>(p, weight, bias, ln_weight, ln_bias, x, cache, nullptr, params, stream);
  const int64_t rows = p.B * p.T;
  const k::RowPlan rp = k::row_plan(rows, p.C, static_cast<int>(p.x_dtype), true);
  const k::ColPlan cp = k::col_plan(p.B, p.T, p.C);
  k::BwdArgs<S, A> a;
  a.dy = static_cast<const S*>(grad_y);
  a.x = static_cast<const S*>(x);
  a.cache = static_cast<const S*>(cache);
  a.params = params;
  a.mean = static_cast<const A*>(mean);
  a.rstd = static_cast<const A*>(rstd);
  a.dz = reinterpret_cast<A*>(base + ws.dz);
  a.part_w = reinterpret_cast<A*>(base + ws.part_w);
  a.part_ln = reinterpret_cast<A*>(base + ws.part_ln);
  a.dx = static_cast<S*>(grad_x);
  a.rows = rows;
  a.B = p.B;
  a.T = p.T;
  a.C = p.C;
  a.K = p.K;
  a.swish = swish;
  a.vec_ok = p.C % VEC == 0 && aligned16(x) && aligned16(cache) && aligned16(grad_y);
  a.group_warps = rp.group_warps;
  a.groups_per_block = rp.groups_per_block;
  a.rows_per_group = rp.rows_per_group;
  a.tile_rows = cp.tile_rows;
  a.tiles_per_seq = cp.tiles_per_seq;
  const int64_t blocks = rows > 0 ? rp.blocks : 0;
  const int64_t tiles = rows > 0 ? cp.tiles : 0;
  if (rows > 0) {
    launch_backward_rows<S, A, VEC>(rp, a, stream);
    const k::LaunchConfig cc = k::col_config(cp);
    switch (k::col_tap_block(p.K)) {
      case 8:
        k::backward_col_kernel<S, A, 8><<<cc.grid, cc.block, cc.smem, stream>>>(a);
        break;
      case 16:
        k::backward_col_kernel<S, A, 16><<<cc.grid, cc.block, cc.smem, stream>>>(a);
        break;
      default:
        k::backward_col_kernel<S, A, 32><<<cc.grid, cc.block, cc.smem, stream>>>(a);
    }
  }
  k::ReduceArgs<A> r;
  r.part_w = a.part_w;
  r.part_ln = a.part_ln;
  r.tiles = tiles;
  r.blocks = blocks;
  r.C = p.C;
  r.K = p.K;
  r.grad_weight = grad_weight;
  r.grad_bias = grad_bias;
  r.grad_ln_weight = grad_ln_weight;
  r.grad_ln_bias = grad_ln_bias;
  r.weight_dtype = static_cast<int>(p.weight_dtype);
  r.bias_dtype = static_cast<int>(p.bias_dtype);
  r.ln_weight_dtype = static_cast<int>(p.ln_weight_dtype);
  r.ln_bias_dtype = static_cast<int>(p.ln_bias_dtype);
  const k::LaunchConfig rc = k::flat_config((p.K + 3) * p.C);
  k::backward_reduce_kernel<A><<<rc.grid, rc.block, rc.smem, stream>>>(r);
  return last_error();
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
  const cudaStream_t s = as_stream(stream);
  switch (p.x_dtype) {
    case DwconvLnDtype::kFloat16:
      return forward_typed<__half, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                          new_cache, mean, rstd, workspace, s);
    case DwconvLnDtype::kBFloat16:
      return forward_typed<__nv_bfloat16, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish,
                                                 y, new_cache, mean, rstd, workspace, s);
    case DwconvLnDtype::kFloat64:
      return forward_typed<double, double>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                           new_cache, mean, rstd, workspace, s);
    default:
      return forward_typed<float, float>(p, x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                         new_cache, mean, rstd, workspace, s);
  }
}

const char* launch_causal_dwconv_ln_backward(const DwconvLnProblem& p, const void* grad_y,
                                             const void* x, const void* weight, const void* bias,
                                             const void* ln_weight, const void* ln_bias,
                                             const void* cache, const void* mean, const void* rstd,
                                             bool swish, void* grad_x, void* grad_weight,
                                             void* grad_bias, void* grad_ln_weight,
                                             void* grad_ln_bias, void* workspace, void* stream) {
  const cudaStream_t s = as_stream(stream);
  switch (p.x_dtype) {
    case DwconvLnDtype::kFloat16:
      return backward_typed<__half, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                           swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                           grad_ln_bias, workspace, s);
    case DwconvLnDtype::kBFloat16:
      return backward_typed<__nv_bfloat16, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean,
                                                  rstd, swish, grad_x, grad_weight, grad_bias,
                                                  grad_ln_weight, grad_ln_bias, workspace, s);
    case DwconvLnDtype::kFloat64:
      return backward_typed<double, double>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                            swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                            grad_ln_bias, workspace, s);
    default:
      return backward_typed<float, float>(p, grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                          swish, grad_x, grad_weight, grad_bias, grad_ln_weight,
                                          grad_ln_bias, workspace, s);
  }
}

}  // namespace cuda
}  // namespace streamssl
