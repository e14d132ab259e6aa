// Self-test kernels of the CUDA emulator: real CUDA (selftest_kernels.cu launches them with <<<>>>
// and the tests compile it with nvcc), run on the CPU through emu_selftest.cpp. Each one exercises
// a built-in the project's kernels use, and two carry deliberate bugs (a missing __syncthreads, a
// shuffle from the wrong lane) that the emulated tests must catch.
//
// The pattern every kernel header follows: kernels plus a *_config() function computing the launch
// configuration, shared by the .cu launcher (<<<cfg.grid, cfg.block, cfg.smem, stream>>>) and the
// emulator binding (cuda_emu::launch(kernel, cfg.grid, cfg.block, cfg.smem, ...)).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "common/macros.h"
#include "cuda/acc_types.cuh"

namespace streamssl_emu_selftest {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;
};

inline unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }
inline unsigned clamp_grid(int64_t blocks, unsigned cap) {
  return blocks < 1 ? 1u : (blocks > int64_t(cap) ? cap : unsigned(blocks));
}

// Storage type <-> float through the kernels' own helpers (csrc/cuda/acc_types.cuh), written
// with the explicit conversion functions: PyTorch's nvcc flags (__CUDA_NO_HALF_CONVERSIONS__ & co.)
// remove the implicit ones.
using ::streamssl::cuda::from_acc;
using ::streamssl::cuda::to_acc;

// ---- 1. Block reduction through static __shared__ memory and __syncthreads --------------------
constexpr int kSumBlock = 256;

// partial[blockIdx.x] = sum of a grid-stride slice of x. kMissingSync drops the barrier between
// filling s[] and the tree: thread t then reads s[t + stride] before its owner wrote it.
template <bool kMissingSync>
__global__ void __launch_bounds__(kSumBlock)
    block_sum_kernel(const float* STREAMSSL_RESTRICT x, float* STREAMSSL_RESTRICT partial, int64_t n) {
  __shared__ float s[kSumBlock];
  const int t = threadIdx.x;
  float acc = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kSumBlock + t; i < n; i += int64_t(gridDim.x) * kSumBlock) acc += x[i];
  s[t] = acc;
  if (!kMissingSync) __syncthreads();
  for (int stride = kSumBlock / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = s[0];
}

// Stage 1 over at most `max_partials` blocks, stage 2 is one block over the partials.
inline LaunchConfig block_sum_config(int64_t n, int64_t max_partials) {
  return {dim3(clamp_grid(ceil_div(n, kSumBlock), unsigned(max_partials))), dim3(kSumBlock), 0};
}

// ---- 2. Warp reductions with shuffles -------------------------------------------------------
enum WarpSumVariant : int {
  kXorButterfly = 0,         // every lane ends with the total
  kDownTree = 1,             // lane 0 ends with the total, then broadcasts it
  kBugUpInsteadOfDown = 2,   // wrong direction: lane 0 never receives the other lanes
  kBugBroadcastFromLane1 = 3 // wrong source lane for the broadcast: lane 1 holds a partial sum
};

// out[i] = sum of the 32 elements of i's warp (x padded with zeros), as lane i sees it.
template <class T>
__global__ void warp_sum_kernel(const T* STREAMSSL_RESTRICT x, T* STREAMSSL_RESTRICT out, int64_t n, int variant) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  T v = i < n ? x[i] : T(0);
  if (variant == kXorButterfly) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  } else {
    for (int offset = 16; offset > 0; offset >>= 1) {
      if (variant == kBugUpInsteadOfDown) {
        v += __shfl_up_sync(kFullMask, v, offset);
      } else {
        v += __shfl_down_sync(kFullMask, v, offset);
      }
    }
    v = __shfl_sync(kFullMask, v, variant == kBugBroadcastFromLane1 ? 1 : 0);
  }
  if (i < n) out[i] = v;
}

inline LaunchConfig warp_sum_config(int64_t n) { return {dim3(clamp_grid(ceil_div(n, 128), 1u << 20)), dim3(128), 0}; }

// ---- 3. Shuffle lane arithmetic (all four kinds, any width) ----------------------------------
enum ShflKind : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };

template <class T>
__global__ void shfl_kernel(const T* STREAMSSL_RESTRICT in, T* STREAMSSL_RESTRICT out, int kind, int arg, int width) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const T v = in[i];
  T r;
  switch (kind) {
    case kShflIdx: r = __shfl_sync(kFullMask, v, arg, width); break;
    case kShflUp: r = __shfl_up_sync(kFullMask, v, unsigned(arg), width); break;
    case kShflDown: r = __shfl_down_sync(kFullMask, v, unsigned(arg), width); break;
    default: r = __shfl_xor_sync(kFullMask, v, arg, width); break;
  }
  out[i] = r;
}

// n must be a multiple of 32: every lane of every warp takes part.
inline LaunchConfig shfl_config(int64_t n) { return {dim3(unsigned(n / 32)), dim3(32), 0}; }

// ---- 4. Ballot-based stream compaction, votes and reducing barriers --------------------------
constexpr int kCompactBlock = 256;

// rank[i] = position of x[i] among the elements of its block with x > threshold, or -1.
// block_stats[4 * b + k]: k=0 __syncthreads_count, 1 __syncthreads_and, 2 __syncthreads_or,
// 3 the block total from the warp-scan. warp_votes[2 * w + k]: k=0 __any_sync, 1 __all_sync.
__global__ void __launch_bounds__(kCompactBlock)
    compact_kernel(const float* STREAMSSL_RESTRICT x, int64_t n, float threshold, int* STREAMSSL_RESTRICT rank,
                   int* STREAMSSL_RESTRICT block_stats, int* STREAMSSL_RESTRICT warp_votes) {
  constexpr int kWarps = kCompactBlock / 32;
  __shared__ int warp_offset[kWarps];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t i = int64_t(blockIdx.x) * kCompactBlock + t;
  const int flag = i < n && x[i] > threshold;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  const int rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
  const int any = __any_sync(kFullMask, flag), all = __all_sync(kFullMask, flag);
  if (lane == 0) {
    warp_offset[warp] = __popc(ballot);
    const int64_t w = int64_t(blockIdx.x) * kWarps + warp;
    warp_votes[2 * w] = any;
    warp_votes[2 * w + 1] = all;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the warp totals with __shfl_up_sync
    const int own = lane < kWarps ? warp_offset[lane] : 0;
    int v = own;
    for (int d = 1; d < 32; d <<= 1) {
      const int u = __shfl_up_sync(kFullMask, v, d);
      if (lane >= d) v += u;
    }
    if (lane < kWarps) warp_offset[lane] = v - own;
    if (lane == 31) block_stats[4 * blockIdx.x + 3] = v;
  }
  const int count = __syncthreads_count(flag);
  const int all_block = __syncthreads_and(flag);
  const int any_block = __syncthreads_or(flag);
  if (t == 0) {
    block_stats[4 * blockIdx.x] = count;
    block_stats[4 * blockIdx.x + 1] = all_block;
    block_stats[4 * blockIdx.x + 2] = any_block;
  }
  if (i < n) rank[i] = flag ? warp_offset[warp] + rank_in_warp : -1;
}

inline LaunchConfig compact_config(int64_t n) { return {dim3(clamp_grid(ceil_div(n, kCompactBlock), 1u << 20)), dim3(kCompactBlock), 0}; }

// ---- 5. Atomics: shared + global histogram, float/double sums, max, CAS ----------------------
constexpr int kHistBins = 37;

STREAMSSL_DEVICE float atomic_max_float(float* address, float value) {
  int* a = reinterpret_cast<int*>(address);
  int old = *a;
  while (__int_as_float(old) < value) {
    const int assumed = old;
    old = atomicCAS(a, assumed, __float_as_int(value));
    if (old == assumed) break;
  }
  return __int_as_float(old);
}

// values >= 0. hist/hist64 get the counts of values % kHistBins, sums the sums, vmax/fmax the maxima.
__global__ void histogram_kernel(const int* STREAMSSL_RESTRICT values, const float* STREAMSSL_RESTRICT fvalues,
                                 int64_t n, int* hist, unsigned long long* hist64, float* fsum, double* dsum,
                                 int* vmax, float* fmax, unsigned int* total) {
  __shared__ unsigned int local[kHistBins];
  for (int b = threadIdx.x; b < kHistBins; b += blockDim.x) local[b] = 0u;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int v = values[i];
    atomicAdd(&local[v % kHistBins], 1u);
    atomicAdd(&hist64[v % kHistBins], 1ull);
    atomicAdd(fsum, float(v));
    atomicAdd(dsum, double(v));
    atomicMax(vmax, v);
    atomic_max_float(fmax, fvalues[i]);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kHistBins; b += blockDim.x) {
    if (local[b] != 0u) {
      atomicAdd(&hist[b], int(local[b]));
      atomicAdd(total, local[b]);
    }
  }
}

inline LaunchConfig histogram_config(int64_t n) { return {dim3(clamp_grid(ceil_div(n, 128), 6)), dim3(128), 0}; }

// ---- 6. Dynamic shared memory ---------------------------------------------------------------
// Reverses every segment of `seg` elements through dynamic shared memory of seg * sizeof(T) bytes.
// The extern array is declared with one type (float4, for 16-byte alignment) in every
// instantiation: nvcc rejects extern __shared__ arrays of different types with the same name.
template <class T>
__global__ void reverse_segments_kernel(const T* STREAMSSL_RESTRICT x, T* STREAMSSL_RESTRICT y, int64_t n, int seg) {
  STREAMSSL_EXTERN_SHARED(float4, smem_raw);
  T* buf = reinterpret_cast<T*>(smem_raw);
  const int64_t start = int64_t(blockIdx.x) * seg;
  const int len = int(n - start < seg ? n - start : seg);
  for (int j = threadIdx.x; j < len; j += blockDim.x) buf[j] = x[start + j];
  __syncthreads();
  for (int j = threadIdx.x; j < len; j += blockDim.x) y[start + j] = buf[len - 1 - j];
}

inline LaunchConfig reverse_segments_config(int64_t n, int seg, size_t elem_size) {
  const unsigned threads = seg >= 256 ? 256u : unsigned((seg + 31) / 32 * 32);
  return {dim3(clamp_grid(ceil_div(n, seg), 1u << 20)), dim3(threads), size_t(seg) * elem_size};
}

// out[i] = word i of dynamic shared memory before anything wrote it (the emulator's poison).
__global__ void smem_peek_kernel(unsigned int* out, int words) {
  STREAMSSL_EXTERN_SHARED(unsigned int, smem_words);
  for (int j = threadIdx.x; j < words; j += blockDim.x) out[j] = smem_words[j];
}

// ---- 7. Grid/block indexing in 3-D and warp formation ---------------------------------------
constexpr int kIndexFields = 10;

// For every thread (g = linear block * threads per block + linear thread):
// out[10g + 0..5] = threadIdx.xyz, blockIdx.xyz; 6 = threads per block; 7 = blocks per grid;
// 8 = linear thread id of lane 0 of its warp (via __shfl_sync); 9 = __shfl_down_sync(tid, 1).
__global__ void index_kernel(int* out) {
  const int tid = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int nthreads = int(blockDim.x * blockDim.y * blockDim.z);
  const int64_t block = int64_t(blockIdx.x) + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  int* o = out + kIndexFields * (block * nthreads + tid);
  o[0] = int(threadIdx.x);
  o[1] = int(threadIdx.y);
  o[2] = int(threadIdx.z);
  o[3] = int(blockIdx.x);
  o[4] = int(blockIdx.y);
  o[5] = int(blockIdx.z);
  o[6] = nthreads;
  o[7] = int(gridDim.x * gridDim.y * gridDim.z);
  o[8] = __shfl_sync(kFullMask, tid, 0);
  o[9] = __shfl_down_sync(kFullMask, tid, 1);
}

// ---- 8. Storage-type conversions -------------------------------------------------------------
template <class From, class To>
__global__ void convert_kernel(const From* STREAMSSL_RESTRICT x, To* STREAMSSL_RESTRICT y, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_acc<To>(to_acc(x[i]));
}

// y = double rounded straight to half (kind 0) or bfloat16 (kind 1), as __double2half does.
__global__ void double_to_16bit_kernel(const double* STREAMSSL_RESTRICT x, unsigned short* STREAMSSL_RESTRICT y,
                                       int64_t n, int kind) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = kind == 0 ? __half_as_ushort(__double2half(x[i])) : __bfloat16_as_ushort(__double2bfloat16(x[i]));
}

// Few blocks with grid-stride loops: a thread's start and exit cost a hand-off in the emulator.
inline LaunchConfig elementwise_config(int64_t n) { return {dim3(clamp_grid(ceil_div(n, 256), 8)), dim3(256), 0}; }

// 16-bit arithmetic intrinsics: out = a op b rounded to T (op 0 __hadd, 1 __hsub, 2 __hmul, 3 __hmax,
// 4 __hmin), plus cmp[i] = bit k set when the k-th comparison (eq, ne, lt, le, gt, ge) holds.
template <class T>
__global__ void arith16_kernel(const T* STREAMSSL_RESTRICT a, const T* STREAMSSL_RESTRICT b, T* STREAMSSL_RESTRICT out,
                               int* STREAMSSL_RESTRICT cmp, int64_t n, int op) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T x = a[i], y = b[i];
    out[i] = op == 0 ? __hadd(x, y) : op == 1 ? __hsub(x, y) : op == 2 ? __hmul(x, y) : op == 3 ? __hmax(x, y) : __hmin(x, y);
    cmp[i] = int(__heq(x, y)) | int(__hne(x, y)) << 1 | int(__hlt(x, y)) << 2 | int(__hle(x, y)) << 3 |
             int(__hgt(x, y)) << 4 | int(__hge(x, y)) << 5;
  }
}

// ---- 9. Warp reduce intrinsics (sm_80+) -----------------------------------------------------
// out[6 * w + k] for warp w: add, min, max (int), min, max (unsigned), and/or/xor folded into one.
__global__ void warp_reduce_kernel(const int* STREAMSSL_RESTRICT x, int* STREAMSSL_RESTRICT out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int v = x[i];
  const unsigned u = unsigned(v);
  const int add = __reduce_add_sync(kFullMask, v);
  const int mn = __reduce_min_sync(kFullMask, v);
  const int mx = __reduce_max_sync(kFullMask, v);
  const unsigned umn = __reduce_min_sync(kFullMask, u);
  const unsigned umx = __reduce_max_sync(kFullMask, u);
  const unsigned bits = __reduce_and_sync(kFullMask, u) ^ (__reduce_or_sync(kFullMask, u) << 1) ^ __reduce_xor_sync(kFullMask, u);
  if ((threadIdx.x & 31) == 0) {
    int* o = out + 6 * (i / 32);
    o[0] = add; o[1] = mn; o[2] = mx; o[3] = int(umn); o[4] = int(umx); o[5] = int(bits);
  }
}

// ---- 10. __syncwarp, early exit -------------------------------------------------------------
// Lanes swap values through shared memory: out[t] = 3 * (t ^ 1). Without the __syncwarp this is
// the legacy "warp-synchronous" bug: it assumes lockstep, which no GPU since Volta guarantees.
__global__ void warp_exchange_kernel(int* out, int missing_syncwarp) {
  __shared__ int buf[256];
  const int t = threadIdx.x;
  buf[t] = 3 * t;
  if (!missing_syncwarp) __syncwarp();
  out[t] = buf[t ^ 1];
}

// Threads at or beyond `active` return at once; the rest still meet at barriers and shuffles.
// out[3 * t]: __syncthreads_count(1), out[3 * t + 1]: __syncthreads_and(1),
// out[3 * t + 2]: __shfl_xor_sync(t, 1) (poison -1 when the partner has exited).
__global__ void early_exit_kernel(int* out, int active) {
  const int t = threadIdx.x;
  if (t >= active) return;
  __syncthreads();
  const int count = __syncthreads_count(1);
  const int all = __syncthreads_and(1);
  const int partner = __shfl_xor_sync(kFullMask, t, 1);
  out[3 * t] = count;
  out[3 * t + 1] = all;
  out[3 * t + 2] = partner;
}

// ---- 11. Schedule probe and deliberately broken synchronisation ------------------------------
// tickets[2 * g + p] = order in which thread g reached phase p (p = 0 before, 1 after a barrier).
__global__ void ticket_kernel(int* counter, int* tickets) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  tickets[2 * g] = atomicAdd(counter, 1);
  __syncthreads();
  tickets[2 * g + 1] = atomicAdd(counter, 1);
}

enum SyncBug : int {
  kDivergentSyncthreads = 0,  // two halves of the block wait at different __syncthreads
  kSyncthreadsVsShuffle = 1,  // half a warp at __syncthreads, the other half at a shuffle
  kPartialMask = 2,           // a shuffle naming 16 lanes while the other 16 are alive
  kMismatchedVotes = 3,       // half a warp at __ballot_sync, the other half at __any_sync
  kTrap = 4,                  // __trap() in one thread
};

__global__ void sync_bug_kernel(int* out, int bug) {
  const int t = threadIdx.x, lane = t & 31;
  int v = t;
  switch (bug) {
    case kDivergentSyncthreads:
      if (t < 16) {
        v += 1;
        __syncthreads();
      } else {
        v += 2;
        __syncthreads();
      }
      break;
    case kSyncthreadsVsShuffle:
      if (lane < 16) __syncthreads();
      else v = __shfl_xor_sync(kFullMask, v, 1);
      break;
    case kPartialMask:
      if (lane < 16) v = __shfl_xor_sync(0x0000FFFFu, v, 1);
      __syncthreads();
      break;
    case kMismatchedVotes:
      v = lane < 16 ? int(__ballot_sync(kFullMask, v & 1)) : __any_sync(kFullMask, v & 1);
      break;
    default:
      if (t == 5) __trap();
      break;
  }
  out[t] = v;
}

}  // namespace streamssl_emu_selftest
