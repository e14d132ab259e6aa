#include "cpu/block_mask.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "cpu/philox_avx2.h"

#if defined(__x86_64__) || defined(_M_X64)
#define STREAMSSL_X86_SSE2_STREAM 1  // SSE2 is part of x86-64: no dispatch needed
#include <emmintrin.h>
#endif

namespace streamssl {
namespace cpu {
namespace {

// Candidate bits of lanes [i0, n) with the scalar Philox and the float64 comparison of the spec.
uint64_t candidate_bits_scalar(const BlockMaskRule& rule, int64_t b, int64_t s0, int i0, int n) {
  uint64_t bits = 0;
  for (int i = i0; i < n; ++i) {
    if (rule.draws_start(b, s0 + static_cast<int64_t>(i) * rule.align)) bits |= uint64_t{1} << i;
  }
  return bits;
}

#if STREAMSSL_CPU_AVX2
// Bits of lanes [0, n - n % 8): 16 frames per step, then one group of 8 if left.
STREAMSSL_CPU_TARGET_AVX2 uint64_t candidate_bits_avx2(const BlockMaskRule& rule, int64_t b,
                                                      int64_t s0, int n) {
  // Integer form of u < mask_prob (BlockMaskRule::start_threshold); start_threshold <= 2^24 and
  // (x >> 8) < 2^24, so a signed compare is exact.
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(rule.start_threshold()));
  const __m256i ctr0 = _mm256_set1_epi32(static_cast<int>(rule.ctr0));
  const __m256i ctr1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b)));
  // Frame counters wrap mod 2^32 like the uint32 counter word; lanes at or past n are dropped.
  const uint32_t align = static_cast<uint32_t>(rule.align);
  const __m256i lane_step = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(static_cast<int>(align)));
  const int full = n - n % 8;
  uint64_t bits = 0;
  for (int g = 0; g < full; g += 16) {
    const int groups = (full - g) >= 16 ? 2 : 1;
    __m256i c0[2], c1[2], c2[2], c3[2];
    for (int v = 0; v < 2; ++v) {
      const uint32_t base = static_cast<uint32_t>(s0) + static_cast<uint32_t>(g + 8 * v) * align;
      c0[v] = ctr0;
      c1[v] = ctr1;
      c2[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), lane_step);
      c3[v] = _mm256_setzero_si256();
    }
    philox4x32_10_avx2<2>(c0, c1, c2, c3, rule.key0, rule.key1);
    for (int v = 0; v < groups; ++v) {
      const __m256i drawn = _mm256_cmpgt_epi32(thr, _mm256_srli_epi32(c0[v], 8));
      const uint64_t lanes = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(drawn)));
      bits |= lanes << (g + 8 * v);
    }
  }
  return bits;
}
#endif

// Candidate bits of 64 consecutive aligned frames s = s0 + i * rule.align (bit i set iff frame s
// draws a block start); only the first n <= 64 bits are computed, the others are zero. AVX2
// Philox with the integer threshold where the CPU has it, BlockMaskRule::draws_start (scalar
// Philox, float64 comparison) otherwise and for the n % 8 tail, so tests exercise both forms.
uint64_t candidate_bits(const BlockMaskRule& rule, int64_t b, int64_t s0, int n) {
#if STREAMSSL_CPU_AVX2
  if (cpu_has_avx2()) {
    return candidate_bits_avx2(rule, b, s0, n) | candidate_bits_scalar(rule, b, s0, n - n % 8, n);
  }
#endif
  return candidate_bits_scalar(rule, b, s0, 0, n);
}

// Zeroes the mask row of utterance b and marks its accepted blocks.
void scan_utterance(const BlockMaskRule& rule, int64_t b, int64_t length, int64_t T, bool* row) {
  std::memset(row, 0, static_cast<size_t>(T));
  if (rule.start_threshold() == 0) return;  // mask_prob below 2^-24: no frame can draw
  const int64_t n = rule.num_candidates(length);
  const int64_t first = rule.first_start();
  SerialMaskRow<bool> mask_row{row};
  BlockMaskScan scan;
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t s0 = first + i0 * rule.align;
    uint64_t bits = candidate_bits(rule, b, s0, static_cast<int>(std::min<int64_t>(64, n - i0)));
    while (bits != 0) {
      const int i = __builtin_ctzll(bits);
      bits &= bits - 1;
      scan.consider(rule, s0 + i * rule.align, length, mask_row);
    }
  }
}

// Size of the last-level cache CPU 0 sees (Linux sysfs), or 32 MiB where that cannot be read.
// STREAMSSL_CPU_LLC_BYTES overrides it (read once; the tests use it to force each write path).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("STREAMSSL_CPU_LLC_BYTES")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && v >= 0) return static_cast<int64_t>(v);
    }
    int64_t best_level = 0, best = int64_t{32} << 20;
    for (int i = 0; i < 16; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t level = 0;
      std::string size;
      if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
      char* end = nullptr;
      int64_t value = std::strtoll(size.c_str(), &end, 10);
      if (*end == 'K') value <<= 10;
      if (*end == 'M') value <<= 20;
      if (*end == 'G') value <<= 30;
      if (level > best_level && value > 0) best_level = level, best = value;
    }
    return best;
  }();
  return bytes;
}

// Whether the write should bypass the caches (non-temporal stores). When input plus output do
// not fit in the last-level cache, output lines are evicted before anyone reads them, and the
// read-for-ownership a normal store does first is a third of the memory traffic for nothing
// (B=32, T=2000, F=80 float32: the write takes ~0.6x the time of a cached copy on the benchmark
// machine). Smaller batches (streaming chunks, cache-resident data) use normal stores.
bool use_streaming_stores(int64_t out_bytes) {
  return 2 * out_bytes > last_level_cache_bytes();
}

// dst[0, n) = src[0, n); dst 16-byte aligned, no alignment needed for src.
void copy_bytes(char* dst, const char* src, size_t n, bool streaming) {
#ifdef STREAMSSL_X86_SSE2_STREAM
  if (streaming) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    for (; i + 16 <= n; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    }
    std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Rows [r0, r1) of the flattened (B*T, row_bytes) output: runs of unmasked rows are contiguous in
// both tensors and go out as one copy each (blocks are tens of frames long, so a handful of
// copies per utterance); masked rows get the embedding. `streaming` needs 16-byte aligned rows.
void write_rows(const char* x, const char* emb, const bool* m, char* y, int64_t r0, int64_t r1,
                size_t row_bytes, bool streaming) {
  int64_t r = r0;
  while (r < r1) {
    int64_t q = r + 1;
    if (!m[r]) {
      while (q < r1 && !m[q]) ++q;
      copy_bytes(y + r * row_bytes, x + r * row_bytes, static_cast<size_t>(q - r) * row_bytes,
                 streaming);
    } else {
      while (q < r1 && m[q]) ++q;
      for (int64_t i = r; i < q; ++i) copy_bytes(y + i * row_bytes, emb, row_bytes, streaming);
    }
    r = q;
  }
#ifdef STREAMSSL_X86_SSE2_STREAM
  if (streaming) _mm_sfence();  // streaming stores are weakly ordered: publish them
#endif
}

}  // namespace

void causal_block_mask(const at::Tensor& feats, const at::Tensor& lengths,
                       const at::Tensor& mask_embedding, const BlockMaskRule& rule,
                       at::Tensor& masked, at::Tensor& mask) {
  const int64_t B = feats.size(0), T = feats.size(1);
  const int64_t* len = lengths.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();

  const size_t row_bytes = static_cast<size_t>(feats.size(2)) * feats.element_size();
  const char* x = static_cast<const char*>(feats.data_ptr());
  const char* emb = static_cast<const char*>(mask_embedding.data_ptr());
  char* y = static_cast<char*>(masked.data_ptr());
  const bool streaming = use_streaming_stores(B * T * static_cast<int64_t>(row_bytes)) &&
                         row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;

  // The scan is sequential within an utterance (the window cap); about 4 ns per aligned frame
  // with AVX2 Philox, small next to the write, which runs at memory speed like clone().
  if (B >= 4 * static_cast<int64_t>(at::get_num_threads())) {
    // Enough utterances to balance the threads: each task scans an utterance and writes its rows
    // while the mask row is hot in L1, in one parallel region.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scan_utterance(rule, b, clamp_length(len[b], T), T, m + b * T);
        if (row_bytes != 0) write_rows(x, emb, m, y, b * T, (b + 1) * T, row_bytes, streaming);
      }
    });
    return;
  }
  // Few utterances (streaming steps, long single files): scan them in parallel, then write rows
  // in parallel, ~64 KiB of output per task at least.
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) scan_utterance(rule, b, clamp_length(len[b], T), T, m + b * T);
  });
  if (row_bytes == 0) return;
  const int64_t grain = std::max<int64_t>(1, 65536 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
    write_rows(x, emb, m, y, r0, r1, row_bytes, streaming);
  });
}

}  // namespace cpu
}  // namespace streamssl
