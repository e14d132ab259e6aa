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

BlockMaskRule block_mask_rule(int64_t seed, int64_t offset, double mask_prob, int64_t block_size,
                              int64_t min_start, int64_t left_context, double max_mask_ratio,
                              int64_t align) {
  const uint64_t s = static_cast<uint64_t>(seed);
  BlockMaskRule r;
  r.key0 = static_cast<uint32_t>(s);
  r.key1 = static_cast<uint32_t>(s >> 32);
  r.ctr0 = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  r.mask_prob = mask_prob;
  r.max_mask_ratio = max_mask_ratio;
  r.block_size = block_size;
  r.min_start = min_start;
  r.left_context = left_context;
  r.align = align;
  return r;
}

void check_block_mask_args(const at::Tensor& feats, const at::Tensor& lengths,
                           const at::Tensor& mask_embedding, double mask_prob, int64_t block_size,
                           int64_t min_start, double max_mask_ratio, int64_t align) {
  TORCH_CHECK(feats.dim() == 3, "causal_block_mask: feats must be (B, T, F), got ", feats.dim(),
              " dimensions");
  TORCH_CHECK(is_supported_float(feats.scalar_type()),
              "causal_block_mask: feats must be float32, float16, bfloat16 or float64, got ",
              feats.scalar_type());
  const int64_t B = feats.size(0), F = feats.size(2);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B,
              "causal_block_mask: lengths must have shape (B,) = (", B, "), got ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "causal_block_mask: lengths must be int64, got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.device() == feats.device(), "causal_block_mask: lengths is on ",
              lengths.device(), " but feats is on ", feats.device());
  TORCH_CHECK(mask_embedding.dim() == 1 && mask_embedding.size(0) == F,
              "causal_block_mask: mask_embedding must have shape (F,) = (", F, "), got ",
              mask_embedding.sizes());
  TORCH_CHECK(mask_embedding.scalar_type() == feats.scalar_type(),
              "causal_block_mask: mask_embedding must have feats' dtype ", feats.scalar_type(),
              ", got ", mask_embedding.scalar_type());
  TORCH_CHECK(mask_embedding.device() == feats.device(), "causal_block_mask: mask_embedding is on ",
              mask_embedding.device(), " but feats is on ", feats.device());
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0,
              "causal_block_mask: mask_prob must be in [0, 1], got ", mask_prob);
  TORCH_CHECK(max_mask_ratio >= 0.0 && max_mask_ratio <= 1.0,
              "causal_block_mask: max_mask_ratio must be in [0, 1], got ", max_mask_ratio);
  TORCH_CHECK(block_size >= 1, "causal_block_mask: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(min_start >= 0, "causal_block_mask: min_start must be >= 0, got ", min_start);
  TORCH_CHECK(align >= 1, "causal_block_mask: align must be >= 1, got ", align);
  TORCH_CHECK(feats.size(1) < (int64_t{1} << 31),
              "causal_block_mask: feats has ", feats.size(1), " frames; at most 2^31 - 1 supported");
}

std::tuple<at::Tensor, at::Tensor> causal_block_mask_cpu(
    const at::Tensor& feats_in, const at::Tensor& lengths_in, const at::Tensor& emb_in,
    int64_t seed, int64_t offset, double mask_prob, int64_t block_size, int64_t min_start,
    int64_t left_context, double max_mask_ratio, int64_t align) {
  check_block_mask_args(feats_in, lengths_in, emb_in, mask_prob, block_size, min_start,
                        max_mask_ratio, align);
  // A negative length is checked here (it costs nothing on the CPU); on CUDA the rule's clamp to
  // [0, T] applies instead, because reading lengths on the host would synchronise the stream.
  if (lengths_in.numel() > 0) {
    TORCH_CHECK(lengths_in.min().item<int64_t>() >= 0,
                "causal_block_mask: lengths must be >= 0, got ", lengths_in);
  }
  const at::Tensor feats = feats_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor emb = emb_in.contiguous();
  at::Tensor masked = at::empty_like(feats, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty({feats.size(0), feats.size(1)}, feats.options().dtype(at::kBool));
  const BlockMaskRule rule = block_mask_rule(seed, offset, mask_prob, block_size, min_start,
                                             left_context, max_mask_ratio, align);
  cpu::causal_block_mask(feats, lengths, emb, rule, masked, mask);
  return {masked, mask};
}

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
