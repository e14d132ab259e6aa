// Emulator bindings of the causal_block_mask CUDA kernels (csrc/cuda/block_mask.cuh), called by
// tests/test_cuda_emu_block_mask.py through ctypes on CPU pointers.
//
//   emu_causal_block_mask            launch_causal_block_mask of csrc/cuda/block_mask.cu with the
//                                    stream left out: the same rule, the same block_mask_enqueue,
//                                    cuda_emu::launch in place of <<<>>>.
//   emu_causal_block_mask_forced     the same kernels with the write grid capped and the index
//                                    type chosen, to run the grid-stride loop and the uint64
//                                    instantiation, which the real configuration only picks for
//                                    outputs far too large to emulate.
//   emu_causal_block_mask_mutant     deliberately wrong launches (kernels swapped, too few warps),
//                                    so the test can show its comparison catches them.
//   emu_block_mask_launch_config     the launch configuration both of them use, for the test to
//                                    check which vector width the write kernel ran with.
#include "cuda_emu.h"  // first: defines STREAMSSL_CUDA_EMU and the CUDA built-ins

#include "cuda/block_mask.cuh"
#include "cuda/block_mask_launch.h"

namespace {

namespace ck = streamssl::cuda_kernels;
using streamssl::BlockMaskRule;
using streamssl::cuda::Dtype;

// The launch policy block_mask_enqueue takes: the .cu launcher's lambda with cuda_emu::launch.
struct EmuLaunch {
  template <class Kernel, class... Args>
  int operator()(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) const {
    return cuda_emu::launch(kernel, grid, block, smem, args...);
  }
};

// Element size of a Dtype code, as element_size() in block_mask.cu; 0 for an unknown code.
int64_t element_size(int64_t dtype) {
  switch (dtype) {
    case static_cast<int64_t>(Dtype::kFloat64):
      return 8;
    case static_cast<int64_t>(Dtype::kFloat32):
      return 4;
    case static_cast<int64_t>(Dtype::kFloat16):
    case static_cast<int64_t>(Dtype::kBFloat16):
      return 2;
    default:
      return 0;
  }
}

// The checks of csrc/ops.cpp (check_block_mask_args) on what reaches the launcher, so a test that
// passes arguments the op would refuse gets a message instead of an emulated out-of-range access.
// Lengths are not checked: the CUDA path clamps them to [0, T], and so does the kernel.
int check_args(int64_t B, int64_t T, int64_t F, int64_t dtype, double mask_prob, int64_t block_size,
               int64_t min_start, double max_mask_ratio, int64_t align) {
  if (B < 0 || B > (int64_t{1} << 32))
    return cuda_emu::invalid_argument("B must be in [0, 2^32], got %lld", (long long)B);
  if (T < 0 || T >= streamssl::kBlockMaskMaxFrames)
    return cuda_emu::invalid_argument("T must be in [0, 2^31), got %lld", (long long)T);
  if (F < 0) return cuda_emu::invalid_argument("F must be >= 0, got %lld", (long long)F);
  if (element_size(dtype) == 0)
    return cuda_emu::invalid_argument("dtype must be a Dtype code (0..3), got %lld", (long long)dtype);
  if (!(mask_prob >= 0.0 && mask_prob <= 1.0))
    return cuda_emu::invalid_argument("mask_prob must be in [0, 1], got %g", mask_prob);
  if (!(max_mask_ratio >= 0.0 && max_mask_ratio <= 1.0))
    return cuda_emu::invalid_argument("max_mask_ratio must be in [0, 1], got %g", max_mask_ratio);
  if (block_size < 1) return cuda_emu::invalid_argument("block_size must be >= 1, got %lld", (long long)block_size);
  if (min_start < 0) return cuda_emu::invalid_argument("min_start must be >= 0, got %lld", (long long)min_start);
  if (align < 1) return cuda_emu::invalid_argument("align must be >= 1, got %lld", (long long)align);
  return 0;
}

// The write kernel of vector width c.vec_bytes, as block_mask_enqueue dispatches it.
int enqueue_write(const ck::BlockMaskLaunchConfig& c, const void* feats, const void* emb,
                  const bool* mask, void* masked) {
  EmuLaunch launch;
  switch (c.vec_bytes) {
    case 16:
      return ck::block_mask_enqueue_write<ck::Bytes16>(launch, c, feats, emb, mask, masked);
    case 8:
      return ck::block_mask_enqueue_write<ck::Bytes8>(launch, c, feats, emb, mask, masked);
    case 4:
      return ck::block_mask_enqueue_write<uint32_t>(launch, c, feats, emb, mask, masked);
    case 2:
      return ck::block_mask_enqueue_write<uint16_t>(launch, c, feats, emb, mask, masked);
    default:
      return ck::block_mask_enqueue_write<uint8_t>(launch, c, feats, emb, mask, masked);
  }
}

ck::BlockMaskLaunchConfig config_for(const void* feats, const void* emb, void* masked, int64_t B,
                                     int64_t T, int64_t F, int64_t dtype) {
  return ck::block_mask_launch_config(B, T, F, element_size(dtype), reinterpret_cast<uintptr_t>(feats),
                                      reinterpret_cast<uintptr_t>(emb), reinterpret_cast<uintptr_t>(masked));
}

}  // namespace

#define EMU_BLOCK_MASK_PARAMS                                                                       \
  const void *feats, const int64_t *lengths, const void *mask_embedding, void *masked, bool *mask, \
      int64_t B, int64_t T, int64_t F, int64_t dtype, int64_t seed, int64_t offset, double mask_prob, \
      int64_t block_size, int64_t min_start, int64_t left_context, double max_mask_ratio, int64_t align

// Checks the arguments and builds the rule from them as ops.cpp does.
#define EMU_BLOCK_MASK_CHECK_AND_RULE                                                                        \
  if (int rc = check_args(B, T, F, dtype, mask_prob, block_size, min_start, max_mask_ratio, align)) return rc; \
  const BlockMaskRule rule = streamssl::make_block_mask_rule(seed, offset, mask_prob, block_size, min_start,   \
                                                             left_context, max_mask_ratio, align)

// causal_block_mask on raw CPU pointers, exactly as launch_causal_block_mask enqueues it: feats and
// masked (B, T, F), mask_embedding (F,), lengths (B,) int64, mask (B, T) bool; dtype a
// Dtype code; the op's arguments, turned into the rule by make_block_mask_rule as ops.cpp
// does.
CUDA_EMU_BINDING(emu_causal_block_mask, EMU_BLOCK_MASK_PARAMS) {
  EMU_BLOCK_MASK_CHECK_AND_RULE;
  return ck::block_mask_enqueue(EmuLaunch{}, rule, feats, lengths, mask_embedding, masked, mask, B, T, F,
                                element_size(dtype));
}

// The same two kernels, the write one with its grid capped at `write_blocks` blocks (so each thread
// strides over several vectors) and uint64 indices when `index64`. The result must not change.
CUDA_EMU_BINDING(emu_causal_block_mask_forced, EMU_BLOCK_MASK_PARAMS, int64_t write_blocks, bool index64) {
  EMU_BLOCK_MASK_CHECK_AND_RULE;
  if (write_blocks < 1) return cuda_emu::invalid_argument("write_blocks must be >= 1, got %lld", (long long)write_blocks);
  if (B == 0 || T == 0) return 0;
  ck::BlockMaskLaunchConfig c = config_for(feats, mask_embedding, masked, B, T, F, dtype);
  if (int rc = cuda_emu::launch(ck::block_mask_scan_kernel, c.scan_grid, c.scan_block, c.smem_bytes, rule,
                                lengths, mask, B, T))
    return rc;
  if (c.n_vecs == 0) return 0;
  if (int64_t(c.write_grid.x) > write_blocks) c.write_grid = dim3(unsigned(write_blocks));
  if (index64) c.index32 = false;
  return enqueue_write(c, feats, mask_embedding, mask, masked);
}

// Wrong launches of the right kernels, each a mistake a launcher could make:
//   1  write kernel before the scan (stream order reversed): the write reads a stale mask;
//   2  scan with half its warps per block: utterances 2 and 3 of every 4 are never scanned.
CUDA_EMU_BINDING(emu_causal_block_mask_mutant, EMU_BLOCK_MASK_PARAMS, int64_t mutant) {
  EMU_BLOCK_MASK_CHECK_AND_RULE;
  if (mutant != 1 && mutant != 2) return cuda_emu::invalid_argument("mutant must be 1 or 2, got %lld", (long long)mutant);
  if (B == 0 || T == 0) return 0;
  const ck::BlockMaskLaunchConfig c = config_for(feats, mask_embedding, masked, B, T, F, dtype);
  const dim3 scan_block = mutant == 2 ? dim3(c.scan_block.x / 2) : c.scan_block;
  if (mutant == 1 && c.n_vecs != 0) {
    if (int rc = enqueue_write(c, feats, mask_embedding, mask, masked)) return rc;
  }
  if (int rc = cuda_emu::launch(ck::block_mask_scan_kernel, c.scan_grid, scan_block, c.smem_bytes, rule, lengths,
                                mask, B, T))
    return rc;
  if (mutant == 2 && c.n_vecs != 0) return enqueue_write(c, feats, mask_embedding, mask, masked);
  return 0;
}

// block_mask_launch_config for these sizes and addresses, into out[0..10): scan grid.x, scan
// block.x, write grid.x, write block.x, smem bytes, vec_bytes, vecs_per_row, n_vecs, index32, and
// the element size of `dtype`.
CUDA_EMU_BINDING(emu_block_mask_launch_config, const void* feats, const void* mask_embedding, void* masked,
                 int64_t B, int64_t T, int64_t F, int64_t dtype, int64_t* out) {
  if (element_size(dtype) == 0)
    return cuda_emu::invalid_argument("dtype must be a Dtype code (0..3), got %lld", (long long)dtype);
  const ck::BlockMaskLaunchConfig c = config_for(feats, mask_embedding, masked, B, T, F, dtype);
  const int64_t values[] = {c.scan_grid.x, c.scan_block.x, c.write_grid.x, c.write_block.x, int64_t(c.smem_bytes),
                            c.vec_bytes,   c.vecs_per_row,  c.n_vecs,       c.index32,       element_size(dtype)};
  for (int i = 0; i < 10; ++i) out[i] = values[i];
  return 0;
}
