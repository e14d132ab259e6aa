// CUDA kernel of the counter-based dropout (csrc/common/dropout_rule.h) as plain device code: the
// launcher (dropout.cu) and the emulator bindings (tests/cuda_emu/emu_dropout.cpp) run the same
// launch sequence, `run_dropout`, over their launch policies.
//
// One thread per Philox block, grid-stride: thread b draws the four words of block b and writes
// elements 32 (b / 8) + 8 j + b % 8, j = 0..3. Eight consecutive threads write 8 consecutive
// elements per word, so a warp's stores fill whole 32-byte sectors (float32) and every element is
// written by exactly one thread: the result does not depend on the launch shape.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dropout_rule.h"
#include "cuda/acc_types.cuh"
#include "cuda/dropout_launch.h"
#include "cuda/launch_config.h"

namespace streamssl {
namespace cuda {
namespace dropout_kernels {

using ::streamssl::cuda::LaunchConfig;

constexpr int kThreads = 256;
// Grid-stride cap: enough blocks to fill any current GPU many times over.
constexpr int64_t kMaxBlocks = 8192;

template <typename T, typename Acc>
struct DropoutArgs {
  const T* x;
  T* y;
  int64_t n;       // elements
  int64_t blocks;  // Philox blocks: 8 per group of 32 elements
  DropoutRule rule;
  Acc scale;
};

template <typename T, typename Acc>
__global__ void dropout_kernel(const DropoutArgs<T, Acc> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < a.blocks; b += stride) {
    const Philox4x32 words = a.rule.block_words(b);
    const int64_t base = (b / kDropoutBlocksPerGroup) * kDropoutGroup + b % kDropoutBlocksPerGroup;
    for (int j = 0; j < 4; ++j) {
      const int64_t e = base + j * kDropoutBlocksPerGroup;
      if (e >= a.n) break;  // later words serve later elements
      const Acc factor = a.rule.keeps(words.v[j]) ? a.scale : Acc(0);
      a.y[e] = from_acc<T>(to_acc(a.x[e]) * factor);
    }
  }
}

// max_grid caps the grid (kMaxBlocks on a GPU; the emulator tests pass a small cap to run the
// grid-stride loop, which real sizes reach only far beyond what can be emulated).
inline LaunchConfig dropout_launch_config(int64_t blocks, int64_t max_grid) {
  const int64_t grid = (blocks + kThreads - 1) / kThreads;
  return LaunchConfig{dim3(static_cast<unsigned>(grid < 1 ? 1 : (grid < max_grid ? grid : max_grid))),
                      dim3(kThreads), 0};
}

// The launch sequence; `launch(kernel, config, args)` returns 0 on success.
template <typename T, typename Acc, typename Launch>
int run_dropout(const void* x, void* y, int64_t n, const DropoutRule& rule, Launch&& launch,
                int64_t max_grid) {
  if (n == 0) return 0;
  const int64_t blocks = (n + kDropoutGroup - 1) / kDropoutGroup * kDropoutBlocksPerGroup;
  const DropoutArgs<T, Acc> a{static_cast<const T*>(x), static_cast<T*>(y), n, blocks, rule,
                              static_cast<Acc>(rule.scale)};
  return launch(dropout_kernel<T, Acc>, dropout_launch_config(blocks, max_grid), a);
}

// run_dropout for a Dtype.
template <typename Launch>
int run_dropout_any(const void* x, void* y, int64_t n, Dtype dtype, const DropoutRule& rule,
                    Launch&& launch, int64_t max_grid = kMaxBlocks) {
  switch (dtype) {
    case Dtype::kFloat16:
      return run_dropout<__half, float>(x, y, n, rule, launch, max_grid);
    case Dtype::kBFloat16:
      return run_dropout<__nv_bfloat16, float>(x, y, n, rule, launch, max_grid);
    case Dtype::kFloat64:
      return run_dropout<double, double>(x, y, n, rule, launch, max_grid);
    default:
      return run_dropout<float, float>(x, y, n, rule, launch, max_grid);
  }
}

}  // namespace dropout_kernels
}  // namespace cuda
}  // namespace streamssl
