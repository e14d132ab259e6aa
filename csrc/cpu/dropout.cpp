#include "cpu/dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/cpu_dispatch.h"
#include "cpu/philox_avx2.h"

namespace streamssl {
namespace cpu {
namespace {

// Two groups (64 elements) per step: two Philox registers in flight in the AVX2 variant.
constexpr int64_t kGroupsPerStep = 2;
constexpr int64_t kStep = kGroupsPerStep * kDropoutGroup;

// Words of the elements of groups g, g + 1 in element order, with the common scalar Philox.
STREAMSSL_CPU_INLINE void step_words_scalar(const DropoutRule& rule, int64_t g, uint32_t* w) {
  for (int64_t k = 0; k < kGroupsPerStep; ++k) {
    for (int64_t l = 0; l < kDropoutBlocksPerGroup; ++l) {
      const Philox4x32 words = rule.block_words((g + k) * kDropoutBlocksPerGroup + l);
      for (int j = 0; j < 4; ++j) w[k * kDropoutGroup + j * kDropoutBlocksPerGroup + l] = words.v[j];
    }
  }
}

// y[i] = x[i] * (w[i] >= threshold ? scale : 0) for i < count, the product in Acc. A select of
// the factor then one multiply, so a dropped NaN stays NaN as with a multiplicative mask.
template <typename T, typename Acc>
STREAMSSL_CPU_INLINE void apply(const T* STREAMSSL_RESTRICT x, T* STREAMSSL_RESTRICT y,
                                const uint32_t* STREAMSSL_RESTRICT w, int64_t count,
                                uint32_t threshold, Acc scale) {
  for (int64_t i = 0; i < count; ++i) {
    const Acc factor = w[i] >= threshold ? scale : Acc(0);
    y[i] = static_cast<T>(static_cast<Acc>(x[i]) * factor);
  }
}

// Elements [32 g0, min(32 g1, n)) with g0 a multiple of kGroupsPerStep.
template <typename T, typename Acc>
void groups_scalar(const T* x, T* y, int64_t n, const DropoutRule& rule, Acc scale, int64_t g0, int64_t g1) {
  alignas(32) uint32_t w[kStep];
  for (int64_t g = g0; g < g1; g += kGroupsPerStep) {
    step_words_scalar(rule, g, w);
    const int64_t e = g * kDropoutGroup;
    apply(x + e, y + e, w, std::min(kStep, n - e), rule.threshold, scale);
  }
}

#if STREAMSSL_CPU_AVX2
template <typename T, typename Acc>
STREAMSSL_CPU_TARGET_AVX2 void groups_avx2(const T* x, T* y, int64_t n, const DropoutRule& rule, Acc scale,
                                           int64_t g0, int64_t g1) {
  // Lane l of register v runs block 8 (g + v) + l; its output word j serves element
  // 32 (g + v) + 8 j + l, so storing word j's register writes 8 consecutive elements' words.
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) uint32_t w[kStep];
  for (int64_t g = g0; g < g1; g += kGroupsPerStep) {
    __m256i c0[kGroupsPerStep], c1[kGroupsPerStep], c2[kGroupsPerStep], c3[kGroupsPerStep];
    for (int v = 0; v < kGroupsPerStep; ++v) {
      // Blocks of one group never straddle a multiple of 2^32 (8 divides 2^32).
      const uint64_t block = static_cast<uint64_t>(g + v) * kDropoutBlocksPerGroup;
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block))), lanes);
      c1[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
      c2[v] = _mm256_setzero_si256();
      c3[v] = _mm256_setzero_si256();
    }
    philox4x32_10_avx2<kGroupsPerStep>(c0, c1, c2, c3, rule.key0, rule.key1);
    for (int v = 0; v < kGroupsPerStep; ++v) {
      __m256i* out = reinterpret_cast<__m256i*>(w + v * kDropoutGroup);
      _mm256_store_si256(out + 0, c0[v]);
      _mm256_store_si256(out + 1, c1[v]);
      _mm256_store_si256(out + 2, c2[v]);
      _mm256_store_si256(out + 3, c3[v]);
    }
    const int64_t e = g * kDropoutGroup;
    apply(x + e, y + e, w, std::min(kStep, n - e), rule.threshold, scale);
  }
}
#endif

template <typename T>
void run(const T* x, T* y, int64_t n, const DropoutRule& rule) {
  using Acc = at::opmath_type<T>;
  const Acc scale = static_cast<Acc>(rule.scale);
  const int64_t steps = (n + kStep - 1) / kStep;
  // ~32k elements per task: each element costs ~1 ns, so tasks stay well above the fork cost.
  at::parallel_for(0, steps, 512, [&](int64_t s0, int64_t s1) {
    const int64_t g0 = s0 * kGroupsPerStep, g1 = s1 * kGroupsPerStep;
#if STREAMSSL_CPU_AVX2
    if (cpu_has_avx2()) return groups_avx2(x, y, n, rule, scale, g0, g1);
#endif
    groups_scalar(x, y, n, rule, scale, g0, g1);
  });
}

}  // namespace

void dropout(const at::Tensor& x, const DropoutRule& rule, at::Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "streamssl_dropout", [&] {
    run<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n, rule);
  });
}

}  // namespace cpu
}  // namespace streamssl
