// Philox4x32-10 of csrc/common/philox.h on 8 counters per AVX2 register, several registers in
// flight so the multiply latency of one hides behind the others. Word for word the common
// function; the kernels that use it (block masking, dropout) are tested against the reference
// and run the common scalar code for their tails and on CPUs without AVX2.
#pragma once

#include <stdint.h>

#include "cpu/cpu_dispatch.h"

#if STREAMSSL_CPU_AVX2
#include <immintrin.h>

namespace streamssl {
namespace cpu {

// hi, lo = the high and low words of a * m per 32-bit lane. AVX2 multiplies 32x32->64 only on
// the even lanes, so even and odd lanes are multiplied separately and blended.
STREAMSSL_CPU_TARGET_AVX2 STREAMSSL_CPU_INLINE void philox_mulhilo_avx2(__m256i a, __m256i m,
                                                                        __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                       // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Ten Philox rounds on N registers of counters (c0..c3)[v], in place: afterwards they hold the
// output words, lane by lane, under the key (k0, k1).
template <int N>
STREAMSSL_CPU_TARGET_AVX2 STREAMSSL_CPU_INLINE void philox4x32_10_avx2(__m256i (&c0)[N], __m256i (&c1)[N],
                                                                       __m256i (&c2)[N], __m256i (&c3)[N],
                                                                       uint32_t k0, uint32_t k1) {
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < N; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      philox_mulhilo_avx2(c0[v], mul0, hi0, lo0);
      philox_mulhilo_avx2(c2[v], mul1, hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

}  // namespace cpu
}  // namespace streamssl
#endif
