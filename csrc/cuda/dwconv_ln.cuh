// CUDA kernels of causal_dwconv_ln, as plain device code (docs/ARCHITECTURE.md): no PyTorch
// headers, raw pointers and sizes. The launchers (dwconv_ln.cu) and the CUDA emulator bindings
// (tests/cuda_emu) both launch them with the configurations computed here.
//
// The launch sequences (run_forward / run_backward at the end) are written once, over a launch
// policy: dwconv_ln.cu passes one that launches with <<<>>> on a stream, the emulator bindings one
// that calls cuda_emu::launch.
//
// Forward: a "row group" of threads (one warp, or several for wide rows) owns a frame (b, t): its
// lanes hold consecutive 16-byte vectors of channels, compute the K-tap conv in registers (the K-1
// frames of halo come from the cache or from x through the L1 cache; a group walks consecutive
// frames, so a block re-reads them from L1), take the LayerNorm statistics with warp shuffles
// (and shared memory across warps), and write y. Accumulation is float32 (float64 for float64).
//
// Backward: (1) the row kernel recomputes the conv, writes dz (float32) to a workspace and keeps
// dgamma/dbeta partials in registers, combined per block in a fixed order; (2) the column kernel,
// one thread per channel over a tile of frames, writes dx and the dweight/dbias partials of the
// tile; (3) the reduce kernel sums the partials over blocks and tiles in a fixed order. No
// atomics: the gradients have the same bits on every run. The partition depends only on the
// shapes, so they also agree between GPUs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "common/dwconv_ln_math.h"
#include "cuda/acc_types.cuh"
#include "cuda/dwconv_ln_launch.h"
#include "cuda/launch_config.h"

// Unroll hints for nvcc's device pass only (g++ compiles this file for the emulator).
#if defined(__CUDA_ARCH__)
#define STREAMSSL_DWCONV_UNROLL _Pragma("unroll")
#else
#define STREAMSSL_DWCONV_UNROLL
#endif

namespace streamssl {
namespace cuda {
namespace dwconv_ln_kernels {

namespace m = ::streamssl::dwconv_ln;

// dtype codes (the values of cuda::Dtype in dtype.h, as plain ints for the kernels)
enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// ---------------------------------------------------------------------------------------------
// Launch configurations (shared by dwconv_ln.cu and the emulator bindings)
// ---------------------------------------------------------------------------------------------

using ::streamssl::cuda::LaunchConfig;

// The widest rows the kernels take: a thread holds at most 16 channels (the backward keeps three
// values per channel in registers) and a row group is at most 32 warps.
constexpr int64_t kMaxChannels = 16 * 32 * 32;

inline int dtype_bytes(int dtype) { return dtype == kF64 ? 8 : (dtype == kF32 ? 4 : 2); }

// How rows are spread over threads. vec: channels per 16-byte access; nch: vectors per thread;
// group_warps: warps that share a row (their reductions go through shared memory);
// groups_per_block: independent row groups in a block (only when group_warps == 1);
// rows_per_group: consecutive frames a group computes.
struct RowPlan {
  int vec, nch, group_warps, groups_per_block, rows_per_group;
  int64_t blocks;
  int threads() const { return 32 * group_warps * groups_per_block; }
};

inline RowPlan row_plan(int64_t rows, int64_t C, int x_dtype, bool backward) {
  RowPlan p;
  p.vec = 16 / dtype_bytes(x_dtype);
  const int nch_max = 16 / p.vec;  // 16 channels per thread
  const int64_t lanes = (C + p.vec - 1) / p.vec;
  if (lanes <= 32 * nch_max) {
    p.group_warps = 1;
    p.groups_per_block = 4;
    p.nch = 1;
    while (32 * p.nch < lanes) p.nch *= 2;
  } else {
    p.nch = nch_max;
    p.group_warps = static_cast<int>((lanes + 32 * p.nch - 1) / (32 * p.nch));
    p.groups_per_block = 1;
  }
  const int64_t gpb = p.groups_per_block;
  if (backward) {
    // Each block writes one dgamma/dbeta partial: keep them to about a thousand.
    p.rows_per_group = static_cast<int>(std::max<int64_t>(1, (rows + 1024 * gpb - 1) / (1024 * gpb)));
  } else {
    // Enough groups to fill a large GPU; longer runs of frames only for big problems.
    p.rows_per_group = static_cast<int>(std::min<int64_t>(8, std::max<int64_t>(1, rows / 32768)));
  }
  const int64_t rows_per_block = gpb * p.rows_per_group;
  p.blocks = (rows + rows_per_block - 1) / rows_per_block;
  return p;
}

inline LaunchConfig row_config(const RowPlan& p) {
  return {dim3(static_cast<unsigned>(p.blocks)), dim3(static_cast<unsigned>(p.threads())), 0};
}

// Column kernel of the backward: tiles of frames x blocks of channels.
struct ColPlan {
  int64_t tile_rows, tiles_per_seq, tiles, channel_blocks;
  int threads;
};

inline ColPlan col_plan(int64_t B, int64_t T, int64_t C) {
  ColPlan p;
  p.tile_rows = std::max<int64_t>(32, (B * T + 511) / 512);  // about 512 tiles at most
  p.tiles_per_seq = (T + p.tile_rows - 1) / p.tile_rows;
  p.tiles = B * p.tiles_per_seq;
  p.threads = static_cast<int>(std::min<int64_t>(128, (C + 31) / 32 * 32));
  p.channel_blocks = (C + p.threads - 1) / p.threads;
  return p;
}

inline LaunchConfig col_config(const ColPlan& p) {
  return {dim3(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.channel_blocks)),
          dim3(static_cast<unsigned>(p.threads)), 0};
}

constexpr int kFlatThreads = 256;

inline LaunchConfig flat_config(int64_t n) {
  return {dim3(static_cast<unsigned>(std::max<int64_t>(1, (n + kFlatThreads - 1) / kFlatThreads))),
          dim3(kFlatThreads), 0};
}

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Workspace layout (bytes). Forward: packed parameters. Backward: packed parameters, dz,
// dweight/dbias partials of the column tiles, dgamma/dbeta partials of the row blocks.
struct Workspace {
  size_t params, dz, part_w, part_ln, total;
};

inline Workspace workspace_layout(int64_t B, int64_t T, int64_t C, int K, int x_dtype,
                                  bool backward) {
  const size_t a = x_dtype == kF64 ? 8 : 4;
  Workspace w{};
  w.params = 0;
  size_t off = align256(a * static_cast<size_t>((K + 3) * C));
  if (backward) {
    const RowPlan rp = row_plan(B * T, C, x_dtype, true);
    const ColPlan cp = col_plan(B, T, C);
    w.dz = off;
    off += align256(a * static_cast<size_t>(B * T * C));
    w.part_w = off;
    off += align256(a * static_cast<size_t>(cp.tiles * (K + 1) * C));
    w.part_ln = off;
    off += align256(a * static_cast<size_t>(rp.blocks * 2 * C));
  }
  w.total = off;
  return w;
}

// ---------------------------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------------------------

// Parameter in any of the four dtypes, read in the accumulation type.
template <typename A>
STREAMSSL_DEVICE A load_param(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16:
      return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kF64:
      return static_cast<A>(static_cast<const double*>(p)[i]);
    default:
      return static_cast<A>(static_cast<const float*>(p)[i]);
  }
}

template <typename A>
STREAMSSL_DEVICE void store_param(void* p, int dtype, int64_t i, A v) {
  switch (dtype) {
    case kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    case kF64:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      break;
    default:
      static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// VEC elements at row[c0 ..] in the accumulation type: one 16-byte load when the rows are
// aligned (vec_ok), else element by element with zeros past C. A null row reads as zeros.
template <typename S, typename A, int VEC>
STREAMSSL_DEVICE void load_vec(const S* STREAMSSL_RESTRICT row, int64_t c0, int64_t C, bool vec_ok,
                               A (&out)[VEC]) {
  if (row == nullptr) {
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) out[l] = A(0);
    return;
  }
  if (vec_ok) {
    static_assert(sizeof(S) * VEC % 16 == 0, "whole 16-byte vectors");
    S e[VEC];
STREAMSSL_DWCONV_UNROLL
    for (int q = 0; q < static_cast<int>(sizeof(S) * VEC / 16); ++q) {
      const uint4 raw = reinterpret_cast<const uint4*>(row + c0)[q];
      memcpy(reinterpret_cast<char*>(e) + 16 * q, &raw, 16);
    }
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) out[l] = static_cast<A>(to_acc(e[l]));
  } else {
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) out[l] = c0 + l < C ? static_cast<A>(to_acc(row[c0 + l])) : A(0);
  }
}

template <typename S, typename A, int VEC>
STREAMSSL_DEVICE void store_vec(S* STREAMSSL_RESTRICT row, int64_t c0, int64_t C, bool vec_ok,
                                const A (&v)[VEC]) {
  if (vec_ok) {
    S e[VEC];
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) e[l] = from_acc<S>(v[l]);
STREAMSSL_DWCONV_UNROLL
    for (int q = 0; q < static_cast<int>(sizeof(S) * VEC / 16); ++q) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(e) + 16 * q, 16);
      reinterpret_cast<uint4*>(row + c0)[q] = raw;
    }
  } else {
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) {
      if (c0 + l < C) row[c0 + l] = from_acc<S>(v[l]);
    }
  }
}

// Row i of xp = cat(cache, x) for batch element b (nullptr: a zero row of the missing cache).
template <typename S>
STREAMSSL_DEVICE const S* xp_row(const S* x, const S* cache, int64_t b, int64_t i, int64_t T,
                                 int64_t C, int K) {
  const m::TapSource s = m::tap_source(i, 0, K);
  if (s.from_cache) return cache ? cache + (b * (K - 1) + s.row) * C : nullptr;
  return x + (b * T + s.row) * C;
}

// ---------------------------------------------------------------------------------------------
// Row-group reductions. Butterfly shuffles leave the same bits in every lane (each level adds
// the same two partial sums, in either order); across warps every thread sums the warps' values
// from shared memory in warp order. Deterministic, and identical for all threads of the group.
// ---------------------------------------------------------------------------------------------
template <typename A, int NV>
STREAMSSL_DEVICE void group_sum(A (&v)[NV], int group_warps, A* red /* 32 * NV */) {
STREAMSSL_DWCONV_UNROLL
  for (int o = 16; o >= 1; o /= 2) {
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
  }
  if (group_warps > 1) {  // then the block is one group
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
STREAMSSL_DWCONV_UNROLL
      for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
    }
    __syncthreads();
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NV; ++i) {
      A s = red[i];
      for (int w = 1; w < group_warps; ++w) s += red[w * NV + i];
      v[i] = s;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Parameter packing (and, in the forward, the new cache)
// ---------------------------------------------------------------------------------------------

template <typename A>
struct PackArgs {
  const void* weight;  // (C, K)
  const void* bias;    // (C,) or null
  const void* ln_weight;
  const void* ln_bias;
  int weight_dtype, bias_dtype, ln_weight_dtype, ln_bias_dtype;
  int64_t C;
  int K;
  A* out;  // (K + 3, C): taps transposed to (K, C), bias, gamma, beta
  // new_cache[b, k] = xp[b, T + k] (forward only; null otherwise), in x's dtype, copied as bytes
  const char* x;
  const char* cache;
  char* new_cache;
  int64_t B, T;
  int elem_bytes;
};

template <typename A>
__global__ void pack_kernel(const PackArgs<A> p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = p.C;
  const int64_t n_params = (p.K + 3) * C;
  if (e < n_params) {
    const int64_t r = e / C, c = e % C;
    A v;
    if (r < p.K) {
      v = load_param<A>(p.weight, p.weight_dtype, c * p.K + r);
    } else if (r == p.K) {
      v = p.bias ? load_param<A>(p.bias, p.bias_dtype, c) : A(0);
    } else if (r == p.K + 1) {
      v = load_param<A>(p.ln_weight, p.ln_weight_dtype, c);
    } else {
      v = load_param<A>(p.ln_bias, p.ln_bias_dtype, c);
    }
    p.out[e] = v;
    return;
  }
  if (p.new_cache == nullptr) return;
  const int64_t R = p.K - 1;
  const int64_t f = e - n_params;  // element of new_cache
  if (f >= p.B * R * C) return;
  const int64_t b = f / (R * C), k = (f / C) % R, c = f % C;
  const m::TapSource s = m::tap_source(p.T + k, 0, p.K);
  char* dst = p.new_cache + f * p.elem_bytes;
  if (!s.from_cache) {
    memcpy(dst, p.x + ((b * p.T + s.row) * C + c) * p.elem_bytes, p.elem_bytes);
  } else if (p.cache != nullptr) {
    memcpy(dst, p.cache + ((b * R + s.row) * C + c) * p.elem_bytes, p.elem_bytes);
  } else {
    memset(dst, 0, p.elem_bytes);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename S, typename A>
struct FwdArgs {
  const S* x;
  const S* cache;  // null: zeros
  const A* params;  // packed: wT (K, C), bias, gamma, beta
  S* y;
  A* mean;
  A* rstd;
  int64_t rows, T, C;
  int K;
  A eps;
  bool swish;
  bool vec_ok;  // every row of x / cache / y starts on 16 bytes and C is a multiple of VEC
  int group_warps, groups_per_block, rows_per_group;
};

// z of the VEC channels at c0 of frame (b, t): bias + the K taps, in the order of conv_taps.
template <typename S, typename A, int VEC>
STREAMSSL_DEVICE void conv_vec(const S* x, const S* cache, const A* wT, const A* bias, int64_t b,
                               int64_t t, int64_t T, int64_t C, int K, int64_t c0, bool vec_ok,
                               A (&z)[VEC]) {
  load_vec<A, A, VEC>(bias, c0, C, vec_ok, z);
  A xv[VEC], wv[VEC];
  m::conv_taps<VEC>(
      z, K,
      [&](int j, int l) {
        if (l == 0) load_vec<A, A, VEC>(wT + static_cast<int64_t>(j) * C, c0, C, vec_ok, wv);
        return wv[l];
      },
      [&](int j, int l) {
        if (l == 0) load_vec<S, A, VEC>(xp_row(x, cache, b, t + j, T, C, K), c0, C, vec_ok, xv);
        return xv[l];
      });
}

template <typename S, typename A, int VEC, int NCH>
__global__ void forward_kernel(const FwdArgs<S, A> p) {
  __shared__ A red[32 * 2];
  const int G = 32 * p.group_warps;
  const int group = threadIdx.x / G, gl = threadIdx.x % G;
  const int64_t C = p.C;
  const A* wT = p.params;
  const A* bias = wT + p.K * C;
  const A* gamma = bias + C;
  const A* beta = gamma + C;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * p.groups_per_block + group) * p.rows_per_group;
  for (int r = 0; r < p.rows_per_group; ++r) {
    const int64_t row = row0 + r;
    if (row >= p.rows) break;  // the same for the whole group
    const int64_t b = row / p.T, t = row % p.T;
    A z[NCH][VEC];
    A sum[1] = {A(0)};
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
      const int64_t c0 = (static_cast<int64_t>(i) * G + gl) * VEC;
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) z[i][l] = A(0);
      if (c0 < C) {
        conv_vec<S, A, VEC>(p.x, p.cache, wT, bias, b, t, p.T, C, p.K, c0, p.vec_ok, z[i]);
STREAMSSL_DWCONV_UNROLL
        for (int l = 0; l < VEC; ++l) sum[0] += z[i][l];  // zero past C
      }
    }
    group_sum(sum, p.group_warps, red);
    const A mean = m::ln_mean(sum[0], C);
    A dev[1] = {A(0)};
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
      const int64_t c0 = (static_cast<int64_t>(i) * G + gl) * VEC;
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) {
        if (c0 + l < C) {
          const A d = z[i][l] - mean;
          dev[0] += d * d;
        }
      }
    }
    group_sum(dev, p.group_warps, red);
    const A rstd = m::ln_rstd(dev[0], C, p.eps);
    S* y = p.y + row * C;
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
      const int64_t c0 = (static_cast<int64_t>(i) * G + gl) * VEC;
      if (c0 >= C) continue;
      A g[VEC], be[VEC], out[VEC];
      load_vec<A, A, VEC>(gamma, c0, C, p.vec_ok, g);
      load_vec<A, A, VEC>(beta, c0, C, p.vec_ok, be);
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) out[l] = m::ln_act(m::ln_xhat(z[i][l], mean, rstd), g[l], be[l], p.swish);
      store_vec<S, A, VEC>(y, c0, C, p.vec_ok, out);
    }
    if (gl == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename S, typename A>
struct BwdArgs {
  const S* dy;
  const S* x;
  const S* cache;
  const A* params;
  const A* mean;
  const A* rstd;
  A* dz;       // (B * T, C) workspace
  A* part_w;   // (tiles, K + 1, C): dweight taps, dbias
  A* part_ln;  // (row blocks, 2, C): dgamma, dbeta
  S* dx;
  int64_t rows, B, T, C;
  int K;
  bool swish;
  bool vec_ok;
  int group_warps, groups_per_block, rows_per_group;
  int64_t tile_rows, tiles_per_seq;
};

// Channels per thread of the row kernels in the block-combine buffer: groups of one warp only
// (wider rows have one group per block), so a block covers at most 32 * 16 channels.
constexpr int kCombineChannels = 32 * 16;

template <typename S, typename A, int VEC, int NCH>
__global__ void backward_row_kernel(const BwdArgs<S, A> p) {
  __shared__ A red[32 * 2];
  __shared__ A combine[2 * kCombineChannels];
  const int G = 32 * p.group_warps;
  const int group = threadIdx.x / G, gl = threadIdx.x % G;
  const int64_t C = p.C;
  const A* wT = p.params;
  const A* bias = wT + p.K * C;
  const A* gamma = bias + C;
  const A* beta = gamma + C;
  A dgamma[NCH][VEC], dbeta[NCH][VEC];
STREAMSSL_DWCONV_UNROLL
  for (int i = 0; i < NCH; ++i) {
STREAMSSL_DWCONV_UNROLL
    for (int l = 0; l < VEC; ++l) dgamma[i][l] = dbeta[i][l] = A(0);
  }
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * p.groups_per_block + group) * p.rows_per_group;
  for (int r = 0; r < p.rows_per_group; ++r) {
    const int64_t row = row0 + r;
    if (row >= p.rows) break;
    const int64_t b = row / p.T, t = row % p.T;
    const A mean = p.mean[row], rstd = p.rstd[row];
    A xh[NCH][VEC], g[NCH][VEC];
    A sums[2] = {A(0), A(0)};  // sum g, sum g * xhat
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
      const int64_t c0 = (static_cast<int64_t>(i) * G + gl) * VEC;
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) xh[i][l] = g[i][l] = A(0);
      if (c0 >= C) continue;
      A z[VEC], dyv[VEC], ga[VEC], be[VEC];
      conv_vec<S, A, VEC>(p.x, p.cache, wT, bias, b, t, p.T, C, p.K, c0, p.vec_ok, z);
      load_vec<S, A, VEC>(p.dy + row * C, c0, C, p.vec_ok, dyv);
      load_vec<A, A, VEC>(gamma, c0, C, p.vec_ok, ga);
      load_vec<A, A, VEC>(beta, c0, C, p.vec_ok, be);
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) {
        if (c0 + l >= C) continue;
        const A x_hat = m::ln_xhat(z[l], mean, rstd);
        const A dh = m::act_grad(dyv[l], x_hat, ga[l], be[l], p.swish);
        xh[i][l] = x_hat;
        g[i][l] = dh * ga[l];
        dgamma[i][l] += dh * x_hat;
        dbeta[i][l] += dh;
        sums[0] += g[i][l];
        sums[1] += g[i][l] * x_hat;
      }
    }
    group_sum(sums, p.group_warps, red);
    const A mean_g = m::ln_mean(sums[0], C), mean_gx = m::ln_mean(sums[1], C);
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
      const int64_t c0 = (static_cast<int64_t>(i) * G + gl) * VEC;
      if (c0 >= C) continue;
      A dz[VEC];
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) dz[l] = m::ln_input_grad(g[i][l], xh[i][l], mean_g, mean_gx, rstd);
      store_vec<A, A, VEC>(p.dz + row * C, c0, C, p.vec_ok, dz);
    }
  }
  // dgamma/dbeta of the block: group 0 adds the other groups' partials, in group order.
  for (int other = 1; other < p.groups_per_block; ++other) {
    if (group == other) {
STREAMSSL_DWCONV_UNROLL
      for (int i = 0; i < NCH; ++i) {
STREAMSSL_DWCONV_UNROLL
        for (int l = 0; l < VEC; ++l) {
          const int64_t c = (static_cast<int64_t>(i) * G + gl) * VEC + l;
          if (c < C) {
            combine[c] = dgamma[i][l];
            combine[kCombineChannels + c] = dbeta[i][l];
          }
        }
      }
    }
    __syncthreads();
    if (group == 0) {
STREAMSSL_DWCONV_UNROLL
      for (int i = 0; i < NCH; ++i) {
STREAMSSL_DWCONV_UNROLL
        for (int l = 0; l < VEC; ++l) {
          const int64_t c = (static_cast<int64_t>(i) * G + gl) * VEC + l;
          if (c < C) {
            dgamma[i][l] += combine[c];
            dbeta[i][l] += combine[kCombineChannels + c];
          }
        }
      }
    }
    __syncthreads();
  }
  if (group == 0) {
    A* part = p.part_ln + static_cast<int64_t>(blockIdx.x) * 2 * C;
STREAMSSL_DWCONV_UNROLL
    for (int i = 0; i < NCH; ++i) {
STREAMSSL_DWCONV_UNROLL
      for (int l = 0; l < VEC; ++l) {
        const int64_t c = (static_cast<int64_t>(i) * G + gl) * VEC + l;
        if (c < C) {
          part[c] = dgamma[i][l];
          part[C + c] = dbeta[i][l];
        }
      }
    }
  }
}

// Taps per pass of the column kernel (its dweight accumulators live in registers): 8, 16 or 32,
// the smallest that holds K (larger K takes several passes of 32).
inline int col_tap_block(int K) { return K <= 8 ? 8 : (K <= 16 ? 16 : 32); }

template <typename S, typename A, int kTapBlock>
__global__ void backward_col_kernel(const BwdArgs<S, A> p) {
  const int64_t tile = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const int64_t C = p.C, T = p.T;
  const int K = p.K;
  const int64_t b = tile / p.tiles_per_seq;
  const int64_t t0 = (tile % p.tiles_per_seq) * p.tile_rows;
  const int64_t t1 = t0 + p.tile_rows < T ? t0 + p.tile_rows : T;
  const A* wT = p.params;
  const A* dz = p.dz + b * T * C + c;  // dz[t * C] is frame t of this channel
  A* part = p.part_w + tile * (K + 1) * C + c;
  // dweight[c, j] += dz[t] * xp[t + j] and dbias += dz[t], frames in order.
  for (int jb = 0; jb < K; jb += kTapBlock) {
    A acc[kTapBlock];
STREAMSSL_DWCONV_UNROLL
    for (int q = 0; q < kTapBlock; ++q) acc[q] = A(0);
    A dbias = A(0);
    for (int64_t t = t0; t < t1; ++t) {
      const A d = dz[t * C];
      dbias += d;
STREAMSSL_DWCONV_UNROLL
      for (int q = 0; q < kTapBlock; ++q) {
        const int j = jb + q;
        if (j < K) {
          const S* xr = xp_row(p.x, p.cache, b, t + j, T, C, K);
          acc[q] += d * (xr ? static_cast<A>(to_acc(xr[c])) : A(0));
        }
      }
    }
STREAMSSL_DWCONV_UNROLL
    for (int q = 0; q < kTapBlock; ++q) {
      if (jb + q < K) part[static_cast<int64_t>(jb + q) * C] = acc[q];
    }
    if (jb == 0) part[static_cast<int64_t>(K) * C] = dbias;
  }
  // dx[s] = sum_j w[j] dz[s + K-1 - j] (dz = 0 beyond T), taps in the order of conv_taps.
  for (int64_t s = t0; s < t1; ++s) {
    A acc[1] = {A(0)};
    m::conv_taps<1>(
        acc, K, [&](int j, int) { return wT[static_cast<int64_t>(j) * C + c]; },
        [&](int j, int) {
          const int64_t u = s + K - 1 - j;
          return u < T ? dz[u * C] : A(0);
        });
    p.dx[(b * T + s) * C + c] = from_acc<S>(acc[0]);
  }
}

template <typename A>
struct ReduceArgs {
  const A* part_w;   // (tiles, K + 1, C)
  const A* part_ln;  // (blocks, 2, C)
  int64_t tiles, blocks, C;
  int K;
  void* grad_weight;  // (C, K)
  void* grad_bias;
  void* grad_ln_weight;
  void* grad_ln_bias;
  int weight_dtype, bias_dtype, ln_weight_dtype, ln_bias_dtype;
};

// One thread per parameter gradient element: the partials in a fixed order (four interleaved
// running sums for memory parallelism, combined as (s0 + s1) + (s2 + s3)).
template <typename A>
__global__ void backward_reduce_kernel(const ReduceArgs<A> p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = p.C;
  const int64_t n_w = (p.K + 1) * C;
  if (e >= n_w + 2 * C) return;
  const A* src;
  int64_t stride, n;
  if (e < n_w) {
    src = p.part_w + e;
    stride = n_w;
    n = p.tiles;
  } else {
    src = p.part_ln + (e - n_w);
    stride = 2 * C;
    n = p.blocks;
  }
  A s[4] = {A(0), A(0), A(0), A(0)};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
STREAMSSL_DWCONV_UNROLL
    for (int q = 0; q < 4; ++q) s[q] += src[(i + q) * stride];
  }
  for (int q = 0; i < n; ++i, ++q) s[q] += src[i * stride];
  const A total = (s[0] + s[1]) + (s[2] + s[3]);
  const int64_t r = e / C, c = e % C;
  if (r < p.K) {
    store_param<A>(p.grad_weight, p.weight_dtype, c * p.K + r, total);
  } else if (r == p.K) {
    store_param<A>(p.grad_bias, p.bias_dtype, c, total);
  } else if (r == p.K + 1) {
    store_param<A>(p.grad_ln_weight, p.ln_weight_dtype, c, total);
  } else {
    store_param<A>(p.grad_ln_bias, p.ln_bias_dtype, c, total);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch sequences. `launch(kernel, config, args)` launches and returns 0, or a nonzero status.
// ---------------------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the row kernels may use 16-byte accesses: every row of the x-typed tensors (x, cache
// and y, or grad_y) starts on 16 bytes. Else they read and write element by element.
inline bool rows_vec_ok(int x_dtype, int64_t C, const void* a, const void* b, const void* c) {
  const int vec = 16 / dtype_bytes(x_dtype);
  return C % vec == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

template <typename A>
PackArgs<A> pack_args(const DwconvLnProblem& p, const void* weight, const void* bias,
                      const void* ln_weight, const void* ln_bias, A* out) {
  PackArgs<A> a;
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
  a.x = nullptr;
  a.cache = nullptr;
  a.new_cache = nullptr;
  a.B = p.B;
  a.T = p.T;
  a.elem_bytes = dtype_bytes(static_cast<int>(p.x_dtype));
  return a;
}

template <typename S, typename A, int VEC, typename Launch>
int launch_forward_rows(const RowPlan& plan, const FwdArgs<S, A>& a, Launch&& launch) {
  const LaunchConfig cfg = row_config(plan);
  if (plan.nch == 1) return launch(forward_kernel<S, A, VEC, 1>, cfg, a);
  if constexpr (VEC <= 8) {
    if (plan.nch == 2) return launch(forward_kernel<S, A, VEC, 2>, cfg, a);
  }
  if constexpr (VEC <= 4) {
    if (plan.nch == 4) return launch(forward_kernel<S, A, VEC, 4>, cfg, a);
  }
  if constexpr (VEC <= 2) {
    if (plan.nch == 8) return launch(forward_kernel<S, A, VEC, 8>, cfg, a);
  }
  return -1;  // row_plan never asks for more than 16 channels per thread
}

template <typename S, typename A, int VEC, typename Launch>
int launch_backward_rows(const RowPlan& plan, const BwdArgs<S, A>& a, Launch&& launch) {
  const LaunchConfig cfg = row_config(plan);
  if (plan.nch == 1) return launch(backward_row_kernel<S, A, VEC, 1>, cfg, a);
  if constexpr (VEC <= 8) {
    if (plan.nch == 2) return launch(backward_row_kernel<S, A, VEC, 2>, cfg, a);
  }
  if constexpr (VEC <= 4) {
    if (plan.nch == 4) return launch(backward_row_kernel<S, A, VEC, 4>, cfg, a);
  }
  if constexpr (VEC <= 2) {
    if (plan.nch == 8) return launch(backward_row_kernel<S, A, VEC, 8>, cfg, a);
  }
  return -1;
}

// Forward: pack the parameters (and copy the new cache), then the row kernel.
template <typename S, typename A, typename Launch>
int run_forward(const DwconvLnProblem& p, const void* x, const void* weight, const void* bias,
                const void* ln_weight, const void* ln_bias, const void* cache, double eps,
                bool swish, void* y, void* new_cache, void* mean, void* rstd, void* workspace,
                Launch&& launch) {
  constexpr int VEC = 16 / sizeof(S);
  const int xd = static_cast<int>(p.x_dtype);
  A* params = reinterpret_cast<A*>(static_cast<char*>(workspace) +
                                   workspace_layout(p.B, p.T, p.C, p.K, xd, false).params);
  PackArgs<A> pa = pack_args<A>(p, weight, bias, ln_weight, ln_bias, params);
  int64_t n_pack = (p.K + 3) * p.C;
  if (p.K > 1 && p.B > 0) {
    pa.x = static_cast<const char*>(x);
    pa.cache = static_cast<const char*>(cache);
    pa.new_cache = static_cast<char*>(new_cache);
    n_pack += p.B * (p.K - 1) * p.C;
  }
  if (int rc = launch(pack_kernel<A>, flat_config(n_pack), pa)) return rc;
  const int64_t rows = p.B * p.T;
  if (rows == 0) return 0;
  const RowPlan plan = row_plan(rows, p.C, xd, false);
  FwdArgs<S, A> a;
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
  a.vec_ok = rows_vec_ok(xd, p.C, x, cache, y);
  a.group_warps = plan.group_warps;
  a.groups_per_block = plan.groups_per_block;
  a.rows_per_group = plan.rows_per_group;
  return launch_forward_rows<S, A, VEC>(plan, a, launch);
}

// Backward: pack, row kernel (dz, dgamma/dbeta partials), column kernel (dx, dweight/dbias
// partials), reduce kernel (the parameter gradients).
template <typename S, typename A, typename Launch>
int run_backward(const DwconvLnProblem& p, const void* grad_y, const void* x, const void* weight,
                 const void* bias, const void* ln_weight, const void* ln_bias, const void* cache,
                 const void* mean, const void* rstd, bool swish, void* grad_x, void* grad_weight,
                 void* grad_bias, void* grad_ln_weight, void* grad_ln_bias, void* workspace,
                 Launch&& launch) {
  constexpr int VEC = 16 / sizeof(S);
  const int xd = static_cast<int>(p.x_dtype);
  const Workspace ws = workspace_layout(p.B, p.T, p.C, p.K, xd, true);
  char* base = static_cast<char*>(workspace);
  A* params = reinterpret_cast<A*>(base + ws.params);
  if (int rc = launch(pack_kernel<A>, flat_config((p.K + 3) * p.C),
                      pack_args<A>(p, weight, bias, ln_weight, ln_bias, params))) {
    return rc;
  }
  const int64_t rows = p.B * p.T;
  const RowPlan rp = row_plan(rows, p.C, xd, true);
  const ColPlan cp = col_plan(p.B, p.T, p.C);
  BwdArgs<S, A> a;
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
  a.vec_ok = rows_vec_ok(xd, p.C, x, cache, grad_y);
  a.group_warps = rp.group_warps;
  a.groups_per_block = rp.groups_per_block;
  a.rows_per_group = rp.rows_per_group;
  a.tile_rows = cp.tile_rows;
  a.tiles_per_seq = cp.tiles_per_seq;
  if (rows > 0) {
    if (int rc = launch_backward_rows<S, A, VEC>(rp, a, launch)) return rc;
    const LaunchConfig cc = col_config(cp);
    int rc;
    switch (col_tap_block(p.K)) {
      case 8:
        rc = launch(backward_col_kernel<S, A, 8>, cc, a);
        break;
      case 16:
        rc = launch(backward_col_kernel<S, A, 16>, cc, a);
        break;
      default:
        rc = launch(backward_col_kernel<S, A, 32>, cc, a);
    }
    if (rc) return rc;
  }
  ReduceArgs<A> r;
  r.part_w = a.part_w;
  r.part_ln = a.part_ln;
  r.tiles = rows > 0 ? cp.tiles : 0;
  r.blocks = rows > 0 ? rp.blocks : 0;
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
  return launch(backward_reduce_kernel<A>, flat_config((p.K + 3) * p.C), r);
}

}  // namespace dwconv_ln_kernels
}  // namespace cuda
}  // namespace streamssl
