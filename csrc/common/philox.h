// Philox4x32-10 counter-based RNG (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy
// as 1, 2, 3", SC 2011), with the round constants that curand and PyTorch use. Counter-based means
// a random word is a pure function of (key, counter): every (utterance, frame) pair draws its own
// number with no state, so CPU threads, CUDA warps and the Python reference agree bit for bit.
#pragma once
#include <stdint.h>

#include "macros.h"

namespace streamssl {

struct Philox4x32 {
  uint32_t v[4];
};

STREAMSSL_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds; key = (k0, k1), counter = (c0, c1, c2, c3).
STREAMSSL_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      uint32_t k0, uint32_t k1) {
  const uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  const uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  Philox4x32 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// A uniform float in [0, 1) with 24 random bits, exactly representable in float and double, so
// comparing it with a float64 probability gives the same answer on every device.
STREAMSSL_HD double philox_uniform24(uint32_t word) {
  return static_cast<double>(word >> 8) * (1.0 / 16777216.0);
}

}  // namespace streamssl
