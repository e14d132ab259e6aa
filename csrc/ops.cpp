// Operator schemas, argument checks and device registration of the streamssl ops.
//
// Every op validates its arguments here, once, for all devices, with messages that name the
// argument; the CPU kernels (csrc/cpu) and the CUDA launchers (csrc/cuda/*.cu, raw pointers and a
// void* stream, no PyTorch headers) receive checked, contiguous tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common/block_mask_rule.h"
#include "cpu/block_mask.h"

#ifdef STREAMSSL_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "cuda/block_mask_launch.h"
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
cuda::BlockMaskDtype block_mask_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::BlockMaskDtype::kFloat16;
    case at::kBFloat16:
      return cuda::BlockMaskDtype::kBFloat16;
    case at::kDouble:
      return cuda::BlockMaskDtype::kFloat64;
    default:
      return cuda::BlockMaskDtype::kFloat32;
  }
}

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
      block_mask_dtype(o.feats.scalar_type()), rule, current_cuda_stream(o.feats.device()));
  TORCH_CHECK(err == nullptr, "causal_block_mask: CUDA kernel launch failed: ", err);
  return {o.masked, o.mask};
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
}

TORCH_LIBRARY_IMPL(streamssl, CPU, m) {
  m.impl("causal_block_mask", &streamssl::causal_block_mask_cpu);
}

#ifdef STREAMSSL_WITH_CUDA
// One line per op with a CUDA kernel.
TORCH_LIBRARY_IMPL(streamssl, CUDA, m) {
  m.impl("causal_block_mask", &streamssl::causal_block_mask_cuda);
}
#endif
