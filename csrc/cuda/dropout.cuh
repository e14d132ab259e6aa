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

inline LaunchConfig dropout_launch_config(int64_t blocks) {
  const int64_t grid = (blocks + kThreads - 1) / kThreads;
  return LaunchConfig{dim3(static_cast<unsigned>(grid < 1 ? 1 : (grid < kMaxBlocks ? grid : kMaxBlocks))),
                      dim3(kThreads), 0};
}

// The launch sequence; `launch(kernel, config, args)` returns 0 on success.
template <typename T, typename Acc, typename Launch>
int run_dropout(const void* x, void* y, int64_t n, const DropoutRule& rule, Launch&& launch) {
  if (n == 0) return 0;
  const int64_t blocks = (n + kDropoutGroup - 1) / kDropoutGroup * kDropoutBlocksPerGroup;
  const DropoutArgs<T, Acc> a{static_cast<const T*>(x), static_cast<T*>(y), n, blocks, rule,
                              static_cast<Acc>(rule.scale)};
  return launch(dropout_kernel<T, Acc>, dropout_launch_config(blocks), a);
}

// run_dropout for a dtype code.
template <typename Launch>
int run_dropout_any(const void* x, void* y, int64_t n, int dtype, const DropoutRule& rule, Launch&& launch) {
  switch (dtype) {
    case 1:
      return run_dropout<__half, float>(x, y, n, rule, launch);
    case 2:
      return run_dropout<__nv_bfloat16, float>(x, y, n, rule, launch);
    case 3:
      return run_dropout<double, double>(x, y, n, rule, launch);
    default:
      return run_dropout<float, float>(x, y, n, rule, launch);
  }
}

}  // namespace dropout_kernels
}  // namespace cuda
}  // namespace streamssl
