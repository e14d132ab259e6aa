// C++ unit tests of csrc/common (header-only math shared by the CPU and CUDA kernels).
// Built and run by CMake/ctest (tests/test_cpp_unit.py drives them from pytest).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/block_mask_rule.h"
#include "common/philox.h"

static int failures = 0;
#define EXPECT(cond)                                                     \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

// Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
static void test_philox_known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const streamssl::Philox4x32 r =
        streamssl::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT(r.v[i] == k.out[i]);
  }
}

static void test_uniform24_range() {
  EXPECT(streamssl::philox_uniform24(0u) == 0.0);
  EXPECT(streamssl::philox_uniform24(0xffffffffu) < 1.0);
  EXPECT(streamssl::philox_uniform24(0xffffffffu) == 1.0 - 1.0 / 16777216.0);
  EXPECT(streamssl::philox_uniform24(0x80000000u) == 0.5);
}

static streamssl::BlockMaskRule make_rule(uint64_t seed, double p, int64_t block, int64_t min_start,
                                          int64_t left, double ratio, int64_t align) {
  streamssl::BlockMaskRule r;
  r.key0 = static_cast<uint32_t>(seed);
  r.key1 = static_cast<uint32_t>(seed >> 32);
  r.ctr0 = 7;
  r.mask_prob = p;
  r.max_mask_ratio = ratio;
  r.block_size = block;
  r.min_start = min_start;
  r.left_context = left;
  r.align = align;
  return r;
}

// The O(L) sliding-count scan against the rule as docs/ARCHITECTURE.md states it (add the block to a copy,
// count the window, keep the copy if the cap holds), plus the range invariants.
static void naive_rule(const streamssl::BlockMaskRule& rule, int64_t b, int64_t L,
                       std::vector<unsigned char>& m) {
  for (int64_t s = rule.first_start(); s < L; s += rule.align) {
    if (!rule.draws_start(b, s)) continue;
    const int64_t e = rule.block_end(s, L), lo = rule.window_start(e);
    std::vector<unsigned char> trial = m;
    for (int64_t t = s; t < e; ++t) trial[t] = 1;
    int64_t count = 0;
    for (int64_t t = lo; t < e; ++t) count += trial[t];
    if (count <= rule.window_cap(e - lo)) m = trial;
  }
}

static void test_scan_matches_naive_rule() {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    const int64_t L = 1 + static_cast<int64_t>((seed * 2654435761u) % 900);
    const int64_t left = (seed % 3 == 0) ? 50 : -1;
    const int64_t align = 1 + seed % 4;
    const auto rule = make_rule(seed * 0x9E3779B97F4A7C15ull, 0.02 + 0.01 * (seed % 7),
                                1 + seed % 45, seed % 20, left, 0.3 + 0.1 * (seed % 8), align);
    std::vector<unsigned char> fast(L + 5, 0), slow(L + 5, 0);
    streamssl::scan_block_mask(rule, 3, L, fast.data());
    naive_rule(rule, 3, L, slow);
    EXPECT(fast == slow);
    for (int64_t t = L; t < L + 5; ++t) EXPECT(fast[t] == 0);
    for (int64_t t = 0; t < rule.min_start && t < L; ++t) EXPECT(fast[t] == 0);
  }
}

int main() {
  test_philox_known_answers();
  test_uniform24_range();
  test_scan_matches_naive_rule();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all common tests passed\n");
  return 0;
}
