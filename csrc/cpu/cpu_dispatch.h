// Run-time choice between the baseline (x86-64 / any) and the AVX2 + FMA + F16C variant of a CPU
// kernel's hot loops: each kernel compiles its loops twice, the second time under
// STREAMSSL_CPU_TARGET_AVX2, and asks cpu_has_avx2() which to run.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define STREAMSSL_CPU_AVX2 1
#define STREAMSSL_CPU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define STREAMSSL_CPU_AVX2 0
#endif
#if defined(__GNUC__)
// Helpers are inlined into both variants so that each is compiled for its instruction set.
#define STREAMSSL_CPU_INLINE __attribute__((always_inline)) inline
#else
#define STREAMSSL_CPU_INLINE inline
#endif

namespace streamssl {
namespace cpu {

// STREAMSSL_CPU_BASELINE=1 forces the baseline variant (tests run it on AVX2 machines too).
inline bool cpu_has_avx2() {
#if STREAMSSL_CPU_AVX2
  static const bool yes = [] {
    const char* force = std::getenv("STREAMSSL_CPU_BASELINE");
    if (force != nullptr && force[0] != '\0' && std::strcmp(force, "0") != 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace streamssl
