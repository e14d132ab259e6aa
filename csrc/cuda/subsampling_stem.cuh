// CUDA kernels of the subsampling stem's fused backward (csrc/common/subsampling_stem_math.h), as
// plain device code: no PyTorch headers, raw pointers and sizes. subsampling_stem.cu launches them
// with <<<>>>, the CUDA emulator bindings (tests/cuda_emu) with cuda_emu::launch, both through
// run_backward below.
//
// (1) The tile kernel: one thread per channel over a tile of stage-0 frames (b, i), walking their
// bins j; consecutive threads read consecutive channels of y0 and grad_y1 (coalesced), the
// features are one broadcast value per tap. Each thread keeps the 19 partial sums of its channel
// in registers and writes them to the workspace. (2) The reduce kernel sums the partials over
// tiles in tile order. No atomics: the same bits on every run, and the partition depends only on
// the shapes, so GPUs agree with each other.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/subsampling_stem_math.h"
#include "cuda/launch_config.h"
#include "cuda/subsampling_stem_launch.h"

namespace streamssl {
namespace cuda {
namespace subsampling_stem_kernels {

namespace m = ::streamssl::stem;

using ::streamssl::cuda::LaunchConfig;

constexpr int kThreads = 128;
constexpr int64_t kMaxTiles = 1024;

// Stage-0 frames per tile: enough tiles to fill a GPU, at most kMaxTiles partials to reduce.
inline int64_t tile_rows(int64_t rows) { return rows <= kMaxTiles ? 1 : (rows + kMaxTiles - 1) / kMaxTiles; }

inline int64_t tile_count(int64_t rows) {
  const int64_t r = tile_rows(rows);
  return rows == 0 ? 0 : (rows + r - 1) / r;
}

inline size_t workspace_bytes(const StemProblem& p) {
  const m::Shape s = m::make_shape(p.B, p.T, p.F, p.C, p.pad);
  const size_t elem = p.float64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(tile_count(s.B * s.T0)) * m::kPartials * static_cast<size_t>(p.C) * elem;
}

template <typename S>
struct TileArgs {
  const S* g1;
  const S* y0;
  const S* feats;
  const S* w1;  // (C, 3, 3)
  S* parts;     // (tiles, 19, C)
  m::Shape s;
  int64_t rows_per_tile;
};

template <typename S>
__global__ void tile_kernel(const TileArgs<S> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const m::Shape& s = a.s;
  if (c >= s.C) return;  // no barriers below
  const int64_t C = s.C, tile = blockIdx.x;
  S w[m::kTaps], part[m::kPartials];
  for (int k = 0; k < m::kTaps; ++k) w[k] = a.w1[c * m::kTaps + k];
  for (int k = 0; k < m::kPartials; ++k) part[k] = S(0);
  const int64_t rows = s.B * s.T0;
  const int64_t r0 = tile * a.rows_per_tile;
  const int64_t r1 = r0 + a.rows_per_tile < rows ? r0 + a.rows_per_tile : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / s.T0, i = r % s.T0;
    for (int64_t j = 0; j < s.F0; ++j) {
      const S y = a.y0[((b * s.T0 + i) * s.F0 + j) * C + c];
      S acc = S(0);
      const bool fed = m::for_each_reader(i, j, s.pad, s.T1, s.F1, [&](int tap, int64_t o, int64_t q) {
        m::tap_update(w[tap], y, a.g1[((b * s.T1 + o) * s.F1 + q) * C + c], acc, part[m::kGradW1 + tap]);
      });
      if (!fed) continue;
      acc = m::relu_gate(acc, y);
      part[m::kGradB0] += acc;
      m::for_each_input(i, j, s.pad, s.T, s.F, [&](int tap, int64_t t, int64_t f) {
        part[m::kGradW0 + tap] += acc * a.feats[(b * s.T + t) * s.F + f];
      });
    }
  }
  for (int k = 0; k < m::kPartials; ++k) a.parts[(tile * m::kPartials + k) * C + c] = part[k];
}

template <typename S>
struct ReduceArgs {
  const S* parts;
  S* grad_w0;
  S* grad_b0;
  S* grad_w1;
  int64_t tiles, C;
};

// One thread per (k, c): the sum over tiles in tile order.
template <typename S>
__global__ void reduce_kernel(const ReduceArgs<S> a) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m::kPartials * a.C) return;
  const int64_t k = e / a.C, c = e % a.C;
  S sum = S(0);
  for (int64_t t = 0; t < a.tiles; ++t) sum += a.parts[(t * m::kPartials + k) * a.C + c];
  if (k < m::kGradB0) {
    a.grad_w0[c * m::kTaps + k] = sum;
  } else if (k == m::kGradB0) {
    a.grad_b0[c] = sum;
  } else {
    a.grad_w1[c * m::kTaps + (k - m::kGradW1)] = sum;
  }
}

// The launch sequence; `launch(kernel, config, args)` returns 0 on success.
template <typename S, typename Launch>
int run_backward(const StemProblem& p, const void* grad_y1, const void* y0, const void* feats,
                 const void* w1, void* grad_w0, void* grad_b0, void* grad_w1, void* workspace,
                 Launch&& launch) {
  const m::Shape s = m::make_shape(p.B, p.T, p.F, p.C, p.pad);
  const int64_t rows = s.B * s.T0;
  const int64_t tiles = tile_count(rows);
  S* parts = static_cast<S*>(workspace);
  const unsigned channel_blocks = static_cast<unsigned>((p.C + kThreads - 1) / kThreads);
  if (tiles > 0) {
    const TileArgs<S> ta{static_cast<const S*>(grad_y1), static_cast<const S*>(y0),
                         static_cast<const S*>(feats), static_cast<const S*>(w1), parts, s, tile_rows(rows)};
    const LaunchConfig tc{dim3(static_cast<unsigned>(tiles), channel_blocks), dim3(kThreads), 0};
    if (int rc = launch(tile_kernel<S>, tc, ta)) return rc;
  }
  const ReduceArgs<S> ra{parts, static_cast<S*>(grad_w0), static_cast<S*>(grad_b0),
                         static_cast<S*>(grad_w1), tiles, p.C};
  const int64_t n = m::kPartials * p.C;
  const LaunchConfig rc{dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)), dim3(kThreads), 0};
  return launch(reduce_kernel<S>, rc, ra);
}

}  // namespace subsampling_stem_kernels
}  // namespace cuda
}  // namespace streamssl
