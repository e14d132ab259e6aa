// CUDA kernels of causal_block_mask as plain device code: no PyTorch headers and no launch
// syntax, so tests/cuda_emu can compile this very file with g++ and run it on the CPU. The
// launcher is csrc/cuda/block_mask.cu; the rule itself is csrc/common/block_mask_rule.h.
//
// Two kernels on one stream, no host synchronisation:
//   scan:  one warp per utterance. The warp zeroes its mask row, then draws block starts for
//          kScanFramesPerLane * 32 aligned frames per step (Philox, one frame per lane per
//          round, several rounds in flight for latency), turns them into bit masks with
//          __ballot_sync and hands the starts in increasing order to BlockMaskScan, whose row
//          policy counts and fills 32 frames at a time. The mask row lives in global memory (the
//          op's bool output), so T is unbounded by shared memory.
//   write: one thread per vector of V bytes of the output; a row is a bit copy of either the
//          input row or the embedding, so the kernel is dtype-agnostic and only the width of
//          the widest aligned vector (16, 8, 4, 2 or 1 bytes) is a template parameter.
#pragma once
#include <stdint.h>

#include "common/block_mask_rule.h"
#include "common/macros.h"

namespace streamssl {
namespace cuda_kernels {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kScanWarpsPerBlock = 4;
constexpr int kScanFramesPerLane = 4;
constexpr int kWriteThreads = 256;
// Grid-stride cap for the write kernel: enough blocks to fill any current GPU many times over.
constexpr int64_t kMaxWriteBlocks = 8192;

// Plain aligned byte vectors (not CUDA's uint4/uint2) so the emulator needs no vector types; a
// copy of an aligned 16-byte struct compiles to one 128-bit load/store.
struct alignas(16) Bytes16 {
  uint32_t w[4];
};
struct alignas(8) Bytes8 {
  uint32_t w[2];
};

// Grid, block and dynamic shared memory of both kernels, and the write kernel's vector width,
// from the sizes and the three data addresses; shared by the launcher and the emulator tests.
struct BlockMaskLaunchConfig {
  dim3 scan_grid, scan_block;    // one warp per utterance
  dim3 write_grid, write_block;  // grid-stride over the output's vectors
  size_t smem_bytes;             // dynamic shared memory of either kernel: none
  int vec_bytes;                 // 16, 8, 4, 2 or 1
  int64_t vecs_per_row;          // F * elem_size / vec_bytes
  int64_t n_vecs;                // B * T * vecs_per_row
  bool index32;                  // the write kernel's indices fit uint32 (i + grid stride < 2^32)
};

// B <= 2^32 (checked in ops.cpp), so the scan grid of B / 4 blocks fits gridDim.x < 2^31.
inline BlockMaskLaunchConfig block_mask_launch_config(int64_t B, int64_t T, int64_t F,
                                                      int64_t elem_size, uintptr_t feats,
                                                      uintptr_t emb, uintptr_t out) {
  BlockMaskLaunchConfig c;
  c.scan_block = dim3(32 * kScanWarpsPerBlock);
  c.scan_grid = dim3(static_cast<unsigned>((B + kScanWarpsPerBlock - 1) / kScanWarpsPerBlock));
  const int64_t row_bytes = F * elem_size;
  c.vec_bytes = 16;
  while (c.vec_bytes > 1 && (row_bytes % c.vec_bytes != 0 || feats % c.vec_bytes != 0 ||
                             emb % c.vec_bytes != 0 || out % c.vec_bytes != 0)) {
    c.vec_bytes /= 2;
  }
  c.vecs_per_row = row_bytes / c.vec_bytes;
  c.n_vecs = B * T * c.vecs_per_row;
  const int64_t blocks = (c.n_vecs + kWriteThreads - 1) / kWriteThreads;
  const int64_t write_blocks = blocks < 1 ? 1 : (blocks < kMaxWriteBlocks ? blocks : kMaxWriteBlocks);
  c.write_block = dim3(kWriteThreads);
  c.write_grid = dim3(static_cast<unsigned>(write_blocks));
  c.index32 = c.n_vecs + write_blocks * kWriteThreads < (int64_t{1} << 32);
  c.smem_bytes = 0;
  return c;
}

// A mask row in global memory, counted and filled by the 32 lanes of a warp together. Every lane
// calls with the same arguments; __syncwarp orders a fill before the next count's reads.
struct WarpMaskRow {
  bool* row;
  unsigned lane;
  STREAMSSL_DEVICE int64_t count(int64_t a, int64_t b) const {
    int64_t n = 0;
    for (int64_t base = a; base < b; base += 32) {
      const int64_t t = base + lane;
      n += __popc(__ballot_sync(kFullWarp, t < b && row[t]));
    }
    return n;
  }
  STREAMSSL_DEVICE void fill(int64_t a, int64_t b) const {
    for (int64_t t = a + lane; t < b; t += 32) row[t] = true;
    __syncwarp();
  }
};

// grid: scan_grid, block: scan_block (kScanWarpsPerBlock warps; warp w of block k serves
// utterance k * kScanWarpsPerBlock + w). Writes mask rows (B, T), all of them.
__global__ void block_mask_scan_kernel(BlockMaskRule rule, const int64_t* STREAMSSL_RESTRICT lengths,
                                       bool* STREAMSSL_RESTRICT mask, int64_t B, int64_t T) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kScanWarpsPerBlock + threadIdx.x / 32;
  const unsigned lane = threadIdx.x % 32;
  if (b >= B) return;  // the whole warp leaves together
  bool* row = mask + b * T;
  for (int64_t t = lane; t < T; t += 32) row[t] = false;
  __syncwarp();
  const uint32_t threshold = rule.start_threshold();  // integer form of u < mask_prob
  if (threshold == 0) return;
  const int64_t length = clamp_length(lengths[b], T);
  const int64_t n = rule.num_candidates(length);
  const int64_t first = rule.first_start();
  const WarpMaskRow mask_row{row, lane};
  BlockMaskScan scan;
  for (int64_t i0 = 0; i0 < n; i0 += 32 * kScanFramesPerLane) {
    // Draw first, vote after: the Philox chains of the kScanFramesPerLane frames are independent,
    // so the compiler interleaves them; lanes past n draw too (no overflow: i < n + 128) and vote
    // false, which keeps the warp converged.
    bool drawn[kScanFramesPerLane];
#pragma unroll
    for (int k = 0; k < kScanFramesPerLane; ++k) {
      const int64_t i = i0 + 32 * k + lane;
      drawn[k] = BlockMaskRule::word_draws(rule.start_word(b, first + i * rule.align), threshold) &&
                 i < n;
    }
    unsigned bits[kScanFramesPerLane];
#pragma unroll
    for (int k = 0; k < kScanFramesPerLane; ++k) bits[k] = __ballot_sync(kFullWarp, drawn[k]);
    for (int k = 0; k < kScanFramesPerLane; ++k) {
      unsigned m = bits[k];
      while (m != 0) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        scan.consider(rule, first + (i0 + 32 * k + j) * rule.align, length, mask_row);
      }
    }
  }
}

// grid: write_grid, block: write_block. out[i] = mask[row(i)] ? emb[i mod vpr] : feats[i] over
// the n vectors of V bytes; Index is uint32_t when the config says the indices fit.
template <typename V, typename Index>
__global__ void block_mask_write_kernel(const V* STREAMSSL_RESTRICT feats,
                                        const V* STREAMSSL_RESTRICT emb,
                                        const bool* STREAMSSL_RESTRICT mask,
                                        V* STREAMSSL_RESTRICT out, Index n, Index vecs_per_row) {
  const Index stride = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  for (Index i = static_cast<Index>(blockIdx.x) * static_cast<Index>(blockDim.x) + threadIdx.x;
       i < n; i += stride) {
    const Index r = i / vecs_per_row;
    if (mask[r]) {
      out[i] = emb[i - r * vecs_per_row];
    } else {
      out[i] = feats[i];
    }
  }
}

// Enqueues both kernels with `launch(kernel, grid, block, smem, args...)`, which returns 0 or an
// error status: the .cu launcher passes a triple-chevron launch on its stream, the emulator
// binding cuda_emu::launch, so both run the same kernels with the same configuration. Returns the
// first nonzero status. `mask` gets (B, T) bools, `masked` (B, T, F) elements of elem_size bytes.
template <typename V, typename Launch>
inline int block_mask_enqueue_write(Launch& launch, const BlockMaskLaunchConfig& c, const void* feats,
                                    const void* emb, const bool* mask, void* masked) {
  const V* x = static_cast<const V*>(feats);
  const V* e = static_cast<const V*>(emb);
  V* y = static_cast<V*>(masked);
  if (c.index32) {
    return launch(block_mask_write_kernel<V, uint32_t>, c.write_grid, c.write_block, c.smem_bytes,
                  x, e, mask, y, static_cast<uint32_t>(c.n_vecs),
                  static_cast<uint32_t>(c.vecs_per_row));
  }
  return launch(block_mask_write_kernel<V, uint64_t>, c.write_grid, c.write_block, c.smem_bytes, x,
                e, mask, y, static_cast<uint64_t>(c.n_vecs), static_cast<uint64_t>(c.vecs_per_row));
}

template <typename Launch>
inline int block_mask_enqueue(Launch&& launch, const BlockMaskRule& rule, const void* feats,
                              const int64_t* lengths, const void* emb, void* masked, bool* mask,
                              int64_t B, int64_t T, int64_t F, int64_t elem_size) {
  if (B == 0 || T == 0) return 0;
  const BlockMaskLaunchConfig c = block_mask_launch_config(
      B, T, F, elem_size, reinterpret_cast<uintptr_t>(feats), reinterpret_cast<uintptr_t>(emb),
      reinterpret_cast<uintptr_t>(masked));
  const int rc = launch(block_mask_scan_kernel, c.scan_grid, c.scan_block, c.smem_bytes, rule,
                        lengths, mask, B, T);
  if (rc != 0 || c.n_vecs == 0) return rc;
  switch (c.vec_bytes) {
    case 16:
      return block_mask_enqueue_write<Bytes16>(launch, c, feats, emb, mask, masked);
    case 8:
      return block_mask_enqueue_write<Bytes8>(launch, c, feats, emb, mask, masked);
    case 4:
      return block_mask_enqueue_write<uint32_t>(launch, c, feats, emb, mask, masked);
    case 2:
      return block_mask_enqueue_write<uint16_t>(launch, c, feats, emb, mask, masked);
    default:
      return block_mask_enqueue_write<uint8_t>(launch, c, feats, emb, mask, masked);
  }
}

}  // namespace cuda_kernels
}  // namespace streamssl
