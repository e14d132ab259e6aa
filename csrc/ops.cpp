// Operator schemas, argument checks and device registration of the streamssl ops.
//
// Every op validates its arguments here, once, for all devices, with messages that name the
// argument; the CPU kernels (csrc/cpu) and the CUDA launchers (csrc/cuda/*.cu, raw pointers and a
// void* stream, no PyTorch headers) receive checked, contiguous tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "common/block_mask_rule.h"
#include "common/dropout_rule.h"
#include "common/subsampling_stem_math.h"
#include "cpu/block_mask.h"
#include "cpu/dropout.h"
#include "cpu/dwconv_ln.h"
#include "cpu/subsampling_stem.h"

#ifdef STREAMSSL_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "cuda/block_mask_launch.h"
#include "cuda/dropout_launch.h"
#include "cuda/dwconv_ln_launch.h"
#include "cuda/subsampling_stem_launch.h"
#endif

namespace streamssl {
namespace {

bool built_with_cuda() {
#ifdef STREAMSSL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef STREAMSSL_WITH_CUDA
// The current CUDA stream of `device` as the plain handle the .cu launchers take. The guard
// implementation is registered by PyTorch's CUDA library at run time, so this file needs no
// CUDA headers and links against a CPU-only PyTorch too.
void* current_cuda_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

// The launchers' element type of a supported float dtype (is_supported_float).
cuda::Dtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::Dtype::kFloat16;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case at::kDouble:
      return cuda::Dtype::kFloat64;
    default:
      return cuda::Dtype::kFloat32;
  }
}
#endif

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// ---------------------------------------------------------------------------------------------
// causal_block_mask
// ---------------------------------------------------------------------------------------------

void check_block_mask_args(const at::Tensor& feats, const at::Tensor& lengths,
                           const at::Tensor& mask_embedding, double mask_prob, int64_t block_size,
                           int64_t min_start, double max_mask_ratio, int64_t align) {
  // ValueError throughout, like the Python-side checks in streamssl/ops/block_mask.py.
  TORCH_CHECK_VALUE(feats.dim() == 3, "causal_block_mask: feats must be (B, T, F), got ",
                    feats.dim(), " dimensions");
  TORCH_CHECK_VALUE(is_supported_float(feats.scalar_type()),
                    "causal_block_mask: feats must be float32, float16, bfloat16 or float64, got ",
                    feats.scalar_type());
  const int64_t B = feats.size(0), F = feats.size(2);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B,
                    "causal_block_mask: lengths must have shape (B,) = (", B, "), got ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong,
                    "causal_block_mask: lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device() == feats.device(), "causal_block_mask: lengths is on ",
                    lengths.device(), " but feats is on ", feats.device());
  TORCH_CHECK_VALUE(mask_embedding.dim() == 1 && mask_embedding.size(0) == F,
                    "causal_block_mask: mask_embedding must have shape (F,) = (", F, "), got ",
                    mask_embedding.sizes());
  TORCH_CHECK_VALUE(mask_embedding.scalar_type() == feats.scalar_type(),
                    "causal_block_mask: mask_embedding must have feats' dtype ",
                    feats.scalar_type(), ", got ", mask_embedding.scalar_type());
  TORCH_CHECK_VALUE(mask_embedding.device() == feats.device(),
                    "causal_block_mask: mask_embedding is on ", mask_embedding.device(),
                    " but feats is on ", feats.device());
  TORCH_CHECK_VALUE(mask_prob >= 0.0 && mask_prob <= 1.0,
                    "causal_block_mask: mask_prob must be in [0, 1], got ", mask_prob);
  TORCH_CHECK_VALUE(max_mask_ratio >= 0.0 && max_mask_ratio <= 1.0,
                    "causal_block_mask: max_mask_ratio must be in [0, 1], got ", max_mask_ratio);
  TORCH_CHECK_VALUE(block_size >= 1, "causal_block_mask: block_size must be >= 1, got ",
                    block_size);
  TORCH_CHECK_VALUE(min_start >= 0, "causal_block_mask: min_start must be >= 0, got ", min_start);
  TORCH_CHECK_VALUE(align >= 1, "causal_block_mask: align must be >= 1, got ", align);
  // Frame indices are uint32 Philox counter words and int64 arithmetic stays far from overflow
  // (csrc/common/block_mask_rule.h); utterance indices are a uint32 counter word.
  TORCH_CHECK_VALUE(feats.size(1) < kBlockMaskMaxFrames, "causal_block_mask: feats has ",
                    feats.size(1), " frames; at most 2^31 - 1 are supported");
  TORCH_CHECK_VALUE(B <= (int64_t{1} << 32), "causal_block_mask: feats has ", B,
                    " utterances; at most 2^32 are supported");
}

struct BlockMaskOutputs {
  at::Tensor feats, lengths, emb, masked, mask;
};

// Contiguous inputs and freshly allocated outputs (the op never writes into its inputs).
BlockMaskOutputs block_mask_buffers(const at::Tensor& feats, const at::Tensor& lengths,
                                    const at::Tensor& emb) {
  BlockMaskOutputs o;
  o.feats = feats.contiguous();
  o.lengths = lengths.contiguous();
  o.emb = emb.contiguous();
  o.masked = at::empty_like(o.feats, at::MemoryFormat::Contiguous);
  o.mask = at::empty({feats.size(0), feats.size(1)}, feats.options().dtype(at::kBool));
  return o;
}

std::tuple<at::Tensor, at::Tensor> causal_block_mask_cpu(
    const at::Tensor& feats, const at::Tensor& lengths, const at::Tensor& emb, int64_t seed,
    int64_t offset, double mask_prob, int64_t block_size, int64_t min_start, int64_t left_context,
    double max_mask_ratio, int64_t align) {
  check_block_mask_args(feats, lengths, emb, mask_prob, block_size, min_start, max_mask_ratio,
                        align);
  // Negative lengths are refused here, where reading them costs nothing; the CUDA kernel clamps
  // them to 0 instead, because checking on the host would synchronise the stream.
  const at::Tensor len = lengths.contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < len.numel(); ++b) {
    TORCH_CHECK_VALUE(l[b] >= 0, "causal_block_mask: lengths must be >= 0, got lengths[", b,
                      "] = ", l[b]);
  }
  BlockMaskOutputs o = block_mask_buffers(feats, len, emb);
  const BlockMaskRule rule = make_block_mask_rule(seed, offset, mask_prob, block_size, min_start,
                                                  left_context, max_mask_ratio, align);
  cpu::causal_block_mask(o.feats, o.lengths, o.emb, rule, o.masked, o.mask);
  return {o.masked, o.mask};
}

#ifdef STREAMSSL_WITH_CUDA
// Same checks as the CPU kernel except the value of lengths: negative lengths count as 0 (the
// rule's clamp), because looking at them on the host would synchronise the stream.
std::tuple<at::Tensor, at::Tensor> causal_block_mask_cuda(
    const at::Tensor& feats, const at::Tensor& lengths, const at::Tensor& emb, int64_t seed,
    int64_t offset, double mask_prob, int64_t block_size, int64_t min_start, int64_t left_context,
    double max_mask_ratio, int64_t align) {
  check_block_mask_args(feats, lengths, emb, mask_prob, block_size, min_start, max_mask_ratio,
                        align);
  const c10::DeviceGuard guard(feats.device());
  BlockMaskOutputs o = block_mask_buffers(feats, lengths, emb);
  const BlockMaskRule rule = make_block_mask_rule(seed, offset, mask_prob, block_size, min_start,
                                                  left_context, max_mask_ratio, align);
  const char* err = cuda::launch_causal_block_mask(
      o.feats.data_ptr(), o.lengths.data_ptr<int64_t>(), o.emb.data_ptr(), o.masked.data_ptr(),
      o.mask.data_ptr<bool>(), o.feats.size(0), o.feats.size(1), o.feats.size(2),
      cuda_dtype(o.feats.scalar_type()), rule, current_cuda_stream(o.feats.device()));
  TORCH_CHECK(err == nullptr, "causal_block_mask: CUDA kernel launch failed: ", err);
  return {o.masked, o.mask};
}
#endif

// ---------------------------------------------------------------------------------------------
// causal_dwconv_ln
// ---------------------------------------------------------------------------------------------

// Bad arguments raise ValueError (TORCH_CHECK_VALUE), like the Python-side checks in
// streamssl/ops/dwconv_ln.py.

// Accumulation dtype: float64 for float64 x, float32 otherwise.
at::ScalarType dwconv_ln_acc_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

// A parameter is read in the accumulation type; it may be in x's dtype, or in float32 when x is
// float16/bfloat16 (float32 master weights under autocast).
void check_dwconv_ln_param(const char* op, const at::Tensor& t, const char* name,
                           const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  const bool ok = t.scalar_type() == x.scalar_type() ||
                  (t.scalar_type() == at::kFloat &&
                   (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16));
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have x's dtype ", x.scalar_type(),
              (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) ? " or float32"
                                                                                  : "",
              ", got ", t.scalar_type());
}

void check_dwconv_ln_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                          const at::Tensor& ln_bias, const std::optional<at::Tensor>& cache) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (B, T, C), got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()),
              op, ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK_VALUE(C >= 1, op, ": x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be (C, K), got ", weight.dim(), " dimensions");
  TORCH_CHECK_VALUE(weight.size(0) == C, op, ": weight must have shape (C, K) with C = ", C,
              " (x's channels), got ", weight.sizes());
  const int64_t K = weight.size(1);
  TORCH_CHECK_VALUE(K >= 1, op, ": weight must have K >= 1 taps, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(K <= 1024, op, ": weight has K = ", K, " taps; at most 1024 are supported");
  check_dwconv_ln_param(op, weight, "weight", x, {C, K});
  if (bias.has_value()) check_dwconv_ln_param(op, *bias, "bias", x, {C});
  check_dwconv_ln_param(op, ln_weight, "ln_weight", x, {C});
  check_dwconv_ln_param(op, ln_bias, "ln_bias", x, {C});
  if (cache.has_value()) {
    const at::Tensor& c = *cache;
    TORCH_CHECK_VALUE(c.device() == x.device(), op, ": cache is on ", c.device(), " but x is on ",
                x.device());
    TORCH_CHECK_VALUE(c.dim() == 3 && c.size(0) == B && c.size(1) == K - 1 && c.size(2) == C, op,
                ": cache must have shape (B, K-1, C) = (", B, ", ", K - 1, ", ", C, "), got ",
                c.sizes());
    TORCH_CHECK_VALUE(c.scalar_type() == x.scalar_type(), op, ": cache must have x's dtype ",
                x.scalar_type(), ", got ", c.scalar_type());
  }
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_forward_outputs(
    const at::Tensor& x, int64_t K) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const auto acc = x.options().dtype(dwconv_ln_acc_dtype(x.scalar_type()));
  return {at::empty({B, T, C}, x.options()), at::empty({B, K - 1, C}, x.options()),
          at::empty({B, T}, acc), at::empty({B, T}, acc)};
}

void check_dwconv_ln_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "causal_dwconv_ln: eps must be finite and >= 0, got ",
              eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_dwconv_ln_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const std::optional<at::Tensor>& cache_in, double eps, bool swish) {
  check_dwconv_ln_args("causal_dwconv_ln", x_in, weight, bias, ln_weight, ln_bias, cache_in);
  check_dwconv_ln_eps(eps);
  const at::Tensor x = x_in.contiguous();
  const std::optional<at::Tensor> cache = contiguous_opt(cache_in);
  auto [y, new_cache, mean, rstd] = dwconv_ln_forward_outputs(x, weight.size(1));
  cpu::causal_dwconv_ln_forward(x, weight, bias, ln_weight, ln_bias, cache, eps, swish, y,
                                new_cache, mean, rstd);
  return {y, new_cache, mean, rstd};
}

void check_dwconv_ln_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "causal_dwconv_ln_backward";
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK_VALUE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  const at::ScalarType acc = dwconv_ln_acc_dtype(x.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                std::pair<const at::Tensor&, const char*>{rstd, "rstd"}}) {
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
                " must have shape (B, T) = (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ",
                t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_backward_outputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  const at::ScalarType bias_dtype = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  return {at::empty(x.sizes(), x.options()),
          at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({weight.size(0)}, weight.options().dtype(bias_dtype)),
          at::empty(ln_weight.sizes(), ln_weight.options()),
          at::empty(ln_bias.sizes(), ln_bias.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_dwconv_ln_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const std::optional<at::Tensor>& cache_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, bool swish) {
  check_dwconv_ln_args("causal_dwconv_ln_backward", x_in, weight, bias, ln_weight, ln_bias,
                       cache_in);
  check_dwconv_ln_backward_args(grad_y_in, x_in, mean_in, rstd_in);
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const std::optional<at::Tensor> cache = contiguous_opt(cache_in);
  auto [gx, gw, gb, gg, gbeta] = dwconv_ln_backward_outputs(x, weight, bias, ln_weight, ln_bias);
  cpu::causal_dwconv_ln_backward(grad_y, x, weight, bias, ln_weight, ln_bias, cache, mean, rstd,
                                 swish, gx, gw, gb, gg, gbeta);
  return {gx, gw, gb, gg, gbeta};
}

#ifdef STREAMSSL_WITH_CUDA
cuda::DwconvLnProblem dwconv_ln_problem(const char* op, const at::Tensor& x,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  cuda::DwconvLnProblem p;
  p.B = x.size(0);
  p.T = x.size(1);
  p.C = x.size(2);
  p.K = static_cast<int>(weight.size(1));
  p.x_dtype = cuda_dtype(x.scalar_type());
  p.weight_dtype = cuda_dtype(weight.scalar_type());
  p.bias_dtype = cuda_dtype(bias.has_value() ? bias->scalar_type() : weight.scalar_type());
  p.ln_weight_dtype = cuda_dtype(ln_weight.scalar_type());
  p.ln_bias_dtype = cuda_dtype(ln_bias.scalar_type());
  const int64_t max_c = cuda::dwconv_ln_max_channels(p.x_dtype);
  TORCH_CHECK_VALUE(p.C <= max_c, op, ": x has C = ", p.C, " channels; the CUDA kernels take at most ",
              max_c, " for ", x.scalar_type());
  TORCH_CHECK_VALUE(p.B * p.T < (int64_t{1} << 31), op, ": x has B * T = ", p.B * p.T,
              " rows; the CUDA kernels take fewer than 2^31");
  return p;
}

// Device scratch of `bytes` (at least 16), from the caching allocator.
at::Tensor cuda_workspace(const at::Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))},
                   x.options().dtype(at::kByte));
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_dwconv_ln_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in,
    const std::optional<at::Tensor>& cache_in, double eps, bool swish) {
  const char* op = "causal_dwconv_ln";
  check_dwconv_ln_args(op, x_in, weight_in, bias_in, ln_weight_in, ln_bias_in, cache_in);
  check_dwconv_ln_eps(eps);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ln_weight = ln_weight_in.contiguous(), ln_bias = ln_bias_in.contiguous();
  const std::optional<at::Tensor> bias = contiguous_opt(bias_in), cache = contiguous_opt(cache_in);
  const cuda::DwconvLnProblem p = dwconv_ln_problem(op, x, weight, bias, ln_weight, ln_bias);
  auto [y, new_cache, mean, rstd] = dwconv_ln_forward_outputs(x, p.K);
  at::Tensor ws = cuda_workspace(x, cuda::dwconv_ln_forward_workspace_bytes(p));
  const char* err = cuda::launch_causal_dwconv_ln_forward(
      p, x.data_ptr(), weight.data_ptr(), opt_ptr(bias), ln_weight.data_ptr(), ln_bias.data_ptr(),
      opt_ptr(cache), eps, swish, y.data_ptr(), new_cache.data_ptr(), mean.data_ptr(),
      rstd.data_ptr(), ws.data_ptr(), current_cuda_stream(x.device()));
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  return {y, new_cache, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
causal_dwconv_ln_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                               const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias_in,
                               const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in,
                               const std::optional<at::Tensor>& cache_in,
                               const at::Tensor& mean_in, const at::Tensor& rstd_in, bool swish) {
  const char* op = "causal_dwconv_ln_backward";
  check_dwconv_ln_args(op, x_in, weight_in, bias_in, ln_weight_in, ln_bias_in, cache_in);
  check_dwconv_ln_backward_args(grad_y_in, x_in, mean_in, rstd_in);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), ln_weight = ln_weight_in.contiguous();
  const at::Tensor ln_bias = ln_bias_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const std::optional<at::Tensor> bias = contiguous_opt(bias_in), cache = contiguous_opt(cache_in);
  const cuda::DwconvLnProblem p = dwconv_ln_problem(op, x, weight, bias, ln_weight, ln_bias);
  auto [gx, gw, gb, gg, gbeta] = dwconv_ln_backward_outputs(x, weight, bias, ln_weight, ln_bias);
  at::Tensor ws = cuda_workspace(x, cuda::dwconv_ln_backward_workspace_bytes(p));
  const char* err = cuda::launch_causal_dwconv_ln_backward(
      p, grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), opt_ptr(bias), ln_weight.data_ptr(),
      ln_bias.data_ptr(), opt_ptr(cache), mean.data_ptr(), rstd.data_ptr(), swish, gx.data_ptr(),
      gw.data_ptr(), gb.data_ptr(), gg.data_ptr(), gbeta.data_ptr(), ws.data_ptr(),
      current_cuda_stream(x.device()));
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  return {gx, gw, gb, gg, gbeta};
}
#endif

// ---------------------------------------------------------------------------------------------
// subsampling_stem_backward
// ---------------------------------------------------------------------------------------------

struct StemTensors {
  at::Tensor grad_y1, y0, feats, w1;
  stem::Shape shape;
};

// ValueError naming the argument, like streamssl/ops/subsampling_stem.py's checks.
StemTensors check_stem_args(const at::Tensor& grad_y1, const at::Tensor& y0,
                            const at::Tensor& feats, const at::Tensor& w1, int64_t pad) {
  const char* op = "subsampling_stem_backward";
  TORCH_CHECK_VALUE(pad == 0 || pad == 1, op, ": time_padding must be 0 or 1, got ", pad);
  TORCH_CHECK_VALUE(feats.dim() == 3, op, ": feats must be (B, T, F), got ", feats.dim(), " dimensions");
  TORCH_CHECK_VALUE(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kDouble, op,
                    ": feats must be float32 or float64, got ", feats.scalar_type());
  TORCH_CHECK_VALUE(y0.dim() == 4, op, ": y0 must be (B, T0, F0, C), got ", y0.dim(), " dimensions");
  const int64_t B = feats.size(0), C = y0.size(3);
  TORCH_CHECK_VALUE(C >= 1, op, ": y0 must have at least one channel, got shape ", y0.sizes());
  const stem::Shape s = stem::make_shape(B, feats.size(1), feats.size(2), C, pad);
  const std::pair<const at::Tensor*, const char*> named[] = {{&y0, "y0"}, {&grad_y1, "grad_y1"}, {&w1, "w1"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK_VALUE(t->device() == feats.device(), op, ": ", name, " is on ", t->device(),
                      " but feats is on ", feats.device());
    TORCH_CHECK_VALUE(t->scalar_type() == feats.scalar_type(), op, ": ", name,
                      " must have feats' dtype ", feats.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(y0.sizes() == at::IntArrayRef({B, s.T0, s.F0, C}), op,
                    ": y0 must have shape (B, T0, F0, C) = (", B, ", ", s.T0, ", ", s.F0, ", ", C,
                    ") for feats of shape ", feats.sizes(), " and time_padding ", pad, ", got ", y0.sizes());
  TORCH_CHECK_VALUE(grad_y1.sizes() == at::IntArrayRef({B, s.T1, s.F1, C}), op,
                    ": grad_y1 must have shape (B, T1, F1, C) = (", B, ", ", s.T1, ", ", s.F1, ", ", C,
                    "), got ", grad_y1.sizes());
  TORCH_CHECK_VALUE(w1.sizes() == at::IntArrayRef({C, 3, 3}), op, ": w1 must have shape (C, 3, 3) = (",
                    C, ", 3, 3), got ", w1.sizes());
  return {grad_y1.contiguous(), y0.contiguous(), feats.contiguous(), w1.contiguous(), s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stem_outputs(const StemTensors& a) {
  const int64_t C = a.shape.C;
  const auto o = a.feats.options();
  return {at::empty({C, 3, 3}, o), at::empty({C}, o), at::empty({C, 3, 3}, o)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subsampling_stem_backward_cpu(
    const at::Tensor& grad_y1, const at::Tensor& y0, const at::Tensor& feats, const at::Tensor& w1,
    int64_t time_padding) {
  const StemTensors a = check_stem_args(grad_y1, y0, feats, w1, time_padding);
  auto [gw0, gb0, gw1] = stem_outputs(a);
  cpu::subsampling_stem_backward(a.grad_y1, a.y0, a.feats, a.w1, time_padding, gw0, gb0, gw1);
  return {gw0, gb0, gw1};
}

#ifdef STREAMSSL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> subsampling_stem_backward_cuda(
    const at::Tensor& grad_y1, const at::Tensor& y0, const at::Tensor& feats, const at::Tensor& w1,
    int64_t time_padding) {
  const StemTensors a = check_stem_args(grad_y1, y0, feats, w1, time_padding);
  const c10::DeviceGuard guard(feats.device());
  auto [gw0, gb0, gw1] = stem_outputs(a);
  const cuda::StemProblem p{a.shape.B, a.shape.T, a.shape.F, a.shape.C, time_padding,
                            a.feats.scalar_type() == at::kDouble};
  at::Tensor ws = cuda_workspace(a.feats, cuda::subsampling_stem_workspace_bytes(p));
  const char* err = cuda::launch_subsampling_stem_backward(
      p, a.grad_y1.data_ptr(), a.y0.data_ptr(), a.feats.data_ptr(), a.w1.data_ptr(), gw0.data_ptr(),
      gb0.data_ptr(), gw1.data_ptr(), ws.data_ptr(), current_cuda_stream(feats.device()));
  TORCH_CHECK(err == nullptr, "subsampling_stem_backward: CUDA kernel launch failed: ", err);
  return {gw0, gb0, gw1};
}
#endif

// ---------------------------------------------------------------------------------------------
// philox_dropout
// ---------------------------------------------------------------------------------------------

// ValueError naming the argument, like streamssl/ops/dropout.py's checks; returns x contiguous.
at::Tensor check_dropout_args(const at::Tensor& x, double p) {
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()),
                    "philox_dropout: x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "philox_dropout: p must be in [0, 1), got ", p);
  return x.contiguous();
}

at::Tensor dropout_cpu(const at::Tensor& x_in, double p, int64_t seed) {
  const at::Tensor x = check_dropout_args(x_in, p);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  cpu::dropout(x, make_dropout_rule(p, seed), y);
  return y;
}

#ifdef STREAMSSL_WITH_CUDA
at::Tensor dropout_cuda(const at::Tensor& x_in, double p, int64_t seed) {
  const at::Tensor x = check_dropout_args(x_in, p);
  const c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const char* err = cuda::launch_dropout(x.data_ptr(), y.data_ptr(), x.numel(), cuda_dtype(x.scalar_type()),
                                         make_dropout_rule(p, seed), current_cuda_stream(x.device()));
  TORCH_CHECK(err == nullptr, "philox_dropout: CUDA kernel launch failed: ", err);
  return y;
}
#endif

}  // namespace
}  // namespace streamssl

TORCH_LIBRARY(streamssl, m) {
  m.def("built_with_cuda() -> bool", &streamssl::built_with_cuda);
  m.def(
      "causal_block_mask(Tensor feats, Tensor lengths, Tensor mask_embedding, int seed, int offset, "
      "float mask_prob, int block_size, int min_start, int left_context, float max_mask_ratio, "
      "int align) -> (Tensor, Tensor)");
  m.def(
      "causal_dwconv_ln(Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, Tensor ln_bias, "
      "Tensor? cache, float eps, bool swish) -> (Tensor y, Tensor new_cache, Tensor mean, "
      "Tensor rstd)");
  m.def(
      "causal_dwconv_ln_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor ln_weight, Tensor ln_bias, Tensor? cache, Tensor mean, Tensor rstd, bool swish) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_ln_weight, "
      "Tensor grad_ln_bias)");
  m.def(
      "subsampling_stem_backward(Tensor grad_y1, Tensor y0, Tensor feats, Tensor w1, "
      "int time_padding) -> (Tensor grad_w0, Tensor grad_b0, Tensor grad_w1)");
  m.def("philox_dropout(Tensor x, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(streamssl, CPU, m) {
  m.impl("causal_block_mask", &streamssl::causal_block_mask_cpu);
  m.impl("causal_dwconv_ln", &streamssl::causal_dwconv_ln_cpu);
  m.impl("causal_dwconv_ln_backward", &streamssl::causal_dwconv_ln_backward_cpu);
  m.impl("subsampling_stem_backward", &streamssl::subsampling_stem_backward_cpu);
  m.impl("philox_dropout", &streamssl::dropout_cpu);
}

#ifdef STREAMSSL_WITH_CUDA
// One line per op with a CUDA kernel.
TORCH_LIBRARY_IMPL(streamssl, CUDA, m) {
  m.impl("causal_block_mask", &streamssl::causal_block_mask_cuda);
  m.impl("causal_dwconv_ln", &streamssl::causal_dwconv_ln_cuda);
  m.impl("causal_dwconv_ln_backward", &streamssl::causal_dwconv_ln_backward_cuda);
  m.impl("subsampling_stem_backward", &streamssl::subsampling_stem_backward_cuda);
  m.impl("philox_dropout", &streamssl::dropout_cuda);
}
#endif
