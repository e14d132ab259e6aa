// CPU kernels of causal_dwconv_ln (docs/ARCHITECTURE.md; math in common/dwconv_ln_math.h).
//
// Work is split into (batch, time tile) tasks. A task walks its frames in blocks of 8: the K-tap
// conv of the 8 frames goes into an L1-resident buffer of 8 x C accumulators (one vector of
// channels at a time, the 8 frames in registers, the taps unrolled for the common K so that each
// input and weight vector is loaded once per block), then each frame's LayerNorm statistics are
// taken from that buffer (two passes) and its activation written. The hot loops are written with
// g++ vector types and compiled twice, for AVX2 + FMA + F16C and for baseline x86-64, picked at
// run time (the extension is built without -march flags).
//
// Reduced-precision inputs are converted once per row into a ring of the last K + 7 rows of
// cat(cache, x) in float32. A frame's result is computed by the same instructions whatever the
// tiling, the blocking or the chunking of the sequence, which makes streaming bit-identical.
//
// The backward recomputes the conv output rather than storing it. A tile also computes dz for the
// K-1 frames after it (the input gradient of a frame needs dz of the next K-1 frames). The
// parameter gradients are accumulated per tile in the accumulation type and summed over tiles in
// tile order; the tiling depends only on the shapes, so the result has the same bits for any
// thread count.
#include "cpu/dwconv_ln.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/dwconv_ln_math.h"

#include "cpu/cpu_dispatch.h"

// The baseline variant passes 32-byte g++ vectors between inlined helpers; g++ notes that AVX
// would pass them differently, which cannot matter for functions internal to this file.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace streamssl {
namespace cpu {
namespace {

using dwconv_ln::AccOf;

// ---------------------------------------------------------------------------------------------
// Conversions between the storage and accumulation types, branch-free so that the channel loops
// vectorise (c10's scalar conversions test for NaN with a float compare, which g++ does not
// if-convert). Both round to nearest even and give the same bits as c10::Half / c10::BFloat16.
// ---------------------------------------------------------------------------------------------
STREAMSSL_CPU_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

STREAMSSL_CPU_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// cond ? a : b as bit arithmetic. A plain ?: whose one arm holds a float operation becomes a
// branch (the operation "may trap" under -ftrapping-math) and stops the vectoriser.
STREAMSSL_CPU_INLINE uint32_t blend(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return (a & m) | (b & ~m);
}

STREAMSSL_CPU_INLINE float to_acc(float v) { return v; }
STREAMSSL_CPU_INLINE double to_acc(double v) { return v; }

STREAMSSL_CPU_INLINE float to_acc(c10::BFloat16 v) {
  return f32_from_bits(static_cast<uint32_t>(v.x) << 16);
}

STREAMSSL_CPU_INLINE float to_acc(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (h & 0x7FFFu) << 13;
  const uint32_t e = o & shifted_exp;
  o += (127u - 15u) << 23;  // rebias the exponent
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  // Subnormal: renormalise through an exact float subtraction of 2^-14.
  const uint32_t subnormal = f32_bits(f32_from_bits(o + (1u << 23)) - f32_from_bits(113u << 23));
  o = blend(e == shifted_exp, inf_nan, blend(e == 0, subnormal, o));
  return f32_from_bits(o | ((h & 0x8000u) << 16));
}

template <typename S>
STREAMSSL_CPU_INLINE S from_acc(float v);

template <>
STREAMSSL_CPU_INLINE float from_acc<float>(float v) {
  return v;
}

template <typename S>
STREAMSSL_CPU_INLINE S from_acc(double v) {
  return v;
}

template <>
STREAMSSL_CPU_INLINE c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;  // NaN as c10 does
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

template <>
STREAMSSL_CPU_INLINE c10::Half from_acc<c10::Half>(float v) {
  uint32_t f = f32_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f16_max = (127u + 16u) << 23;                  // 65536.0f: rounds to inf
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
  const uint32_t big = f > (255u << 23) ? 0x7E00u : 0x7C00u;    // NaN : inf
  // Below 2^-14 the result is subnormal: adding 0.5f aligns the mantissa so that the FPU's own
  // round-to-nearest-even does the rounding.
  const uint32_t small = f32_bits(f32_from_bits(f) + f32_from_bits(denorm_magic)) - denorm_magic;
  // Normal: rebias, and round to nearest even by hand.
  const uint32_t normal = (f + ((15u - 127u) << 23) + 0xFFFu + ((f >> 13) & 1u)) >> 13;
  const uint32_t o = blend(f >= f16_max, big, blend(f < (113u << 23), small, normal));
  return c10::Half(static_cast<uint16_t>(o | (sign >> 16)), c10::Half::from_bits());
}

// g++ vector types for the tap loop: 32 bytes (one AVX register, two SSE registers). Loops over
// arrays of accumulators are vectorised by g++ only when it can prove enough about them, and it
// then keeps them in memory; vector types put the accumulators in registers by construction.
template <typename A>
struct VecOf {
  typedef A type __attribute__((vector_size(32)));  // (g++ ignores the attribute in an alias)
  // The same vector at any element alignment, for loads and stores from rows.
  typedef A unaligned __attribute__((vector_size(32), aligned(alignof(A)), may_alias));
};
template <typename A>
using Vec = typename VecOf<A>::type;
static_assert(sizeof(Vec<float>) == 32 && sizeof(Vec<double>) == 32, "g++ vector types");
template <typename A>
constexpr int kVecLanes = 32 / static_cast<int>(sizeof(A));

template <typename A>
STREAMSSL_CPU_INLINE Vec<A> vload(const A* p) {
  return *reinterpret_cast<const typename VecOf<A>::unaligned*>(p);
}

template <typename A>
STREAMSSL_CPU_INLINE void vstore(A* p, const Vec<A>& v) {
  *reinterpret_cast<typename VecOf<A>::unaligned*>(p) = v;
}

// Frames per register block of the tap loops: the accumulators of 8 frames x 8 channels are 8
// AVX registers; each tap's weights are loaded once for the 8 frames.
constexpr int kRowBlock = 8;

// out(r)[c] = init[c] (0 when init is null) + sum_j w[j * C + c] * src(j, r)[c] for r < NR and
// all c < C, taps in the order of conv_taps. Frames are the register block: the conv of NR
// consecutive frames (src(j, r) = xp row t + r + j) and their input gradients (src(j, r) = dz
// row s + r + K-1 - j). A frame's result does not depend on NR, so any blocking of a sequence
// gives the same bits.
//
// KC > 0 is K known at compile time: the taps unroll completely, and g++ then loads each
// input vector and each weight vector of a channel block once for all NR frames (instead of
// once per frame and tap), which is what makes the loop fast; KC = 0 serves any K.
template <int NR, int KC, typename A, typename Src, typename Out>
STREAMSSL_CPU_INLINE void tap_rows_k(Src&& src, const A* w, const A* init, int K, int64_t C,
                                     Out&& out) {
  constexpr int V = kVecLanes<A>;
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) {
    Vec<A> acc[NR];
    const Vec<A> start = init ? vload(init + c0) : Vec<A>{};
    for (int r = 0; r < NR; ++r) acc[r] = start;
    dwconv_ln::conv_taps<NR, KC>(
        acc, K, [&](int j, int) { return vload(w + j * C + c0); },
        [&](int j, int r) { return vload(src(j, r) + c0); });
    for (int r = 0; r < NR; ++r) vstore(out(r) + c0, acc[r]);
  }
  for (; c0 < C; ++c0) {
    A acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = init ? init[c0] : A(0);
    dwconv_ln::conv_taps<NR, KC>(
        acc, K, [&](int j, int) { return w[j * C + c0]; },
        [&](int j, int r) { return src(j, r)[c0]; });
    for (int r = 0; r < NR; ++r) out(r)[c0] = acc[r];
  }
}

// Kernel sizes with an unrolled block loop: the common Conformer ones.
template <int NR, typename A, typename Src, typename Out>
STREAMSSL_CPU_INLINE void tap_rows(Src&& src, const A* w, const A* init, int K, int64_t C,
                                   Out&& out) {
  if constexpr (NR > 1) {
    switch (K) {
      case 1:
        return tap_rows_k<NR, 1>(src, w, init, K, C, out);
      case 3:
        return tap_rows_k<NR, 3>(src, w, init, K, C, out);
      case 5:
        return tap_rows_k<NR, 5>(src, w, init, K, C, out);
      case 7:
        return tap_rows_k<NR, 7>(src, w, init, K, C, out);
      case 9:
        return tap_rows_k<NR, 9>(src, w, init, K, C, out);
      case 15:
        return tap_rows_k<NR, 15>(src, w, init, K, C, out);
      case 31:
        return tap_rows_k<NR, 31>(src, w, init, K, C, out);
      default:
        break;
    }
  }
  tap_rows_k<NR, 0>(src, w, init, K, C, out);
}

// Independent partial sums in the row reductions (their combination order is fixed).
template <typename A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));

// Parameters in the accumulation type: taps transposed to (K, C) so that the channel loop is
// contiguous, then bias (zeros when absent), gamma, beta, and a row of zeros for missing cache.
template <typename A>
struct PackedParams {
  std::vector<A> buf;
  const A* wT = nullptr;
  const A* bias = nullptr;
  const A* gamma = nullptr;
  const A* beta = nullptr;
  const A* zeros = nullptr;
};

// Reads a parameter in the accumulation type (without an ATen call when it already is one: the
// streaming step is small enough that dispatcher round trips show).
template <typename A>
void read_param(const at::Tensor& t, A* out) {
  const auto acc = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  if (t.scalar_type() == acc && t.is_contiguous()) {
    std::memcpy(out, t.data_ptr<A>(), sizeof(A) * t.numel());
  } else {
    const at::Tensor c = t.to(acc).contiguous();
    std::memcpy(out, c.data_ptr<A>(), sizeof(A) * c.numel());
  }
}

template <typename A>
PackedParams<A> pack_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  const int64_t C = weight.size(0), K = weight.size(1);
  PackedParams<A> p;
  p.buf.assign(static_cast<size_t>((2 * K + 4) * C), A(0));
  A* wT = p.buf.data();
  A* ws = wT + K * C;  // (C, K) as given, then transposed into wT
  read_param(weight, ws);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < K; ++j) wT[j * C + c] = ws[c * K + j];
  }
  A* rest = ws + K * C;
  if (bias.has_value()) read_param(*bias, rest);
  read_param(ln_weight, rest + C);
  read_param(ln_bias, rest + 2 * C);
  p.wT = wT;
  p.bias = rest;
  p.gamma = rest + C;
  p.beta = rest + 2 * C;
  p.zeros = rest + 3 * C;
  return p;
}

template <typename S, typename A>
struct Args {
  const S* x;
  const S* cache;  // nullptr: zeros
  const A* wT;
  const A* bias;
  const A* gamma;
  const A* beta;
  const A* zeros;
  A* mean;
  A* rstd;
  int64_t T, C;
  int K;
  A eps;
  // forward
  S* y;
  S* new_cache;  // (B, K-1, C), or nullptr when K = 1
  // backward
  const S* dy;
  S* dx;
};

// Rows of xp = cat(cache, x) for one batch element, in the accumulation type, for a window of
// K + kRowBlock - 1 rows sliding forward: direct pointers for float32/float64, a ring of
// converted rows otherwise.
template <typename S, typename A>
class XpRows {
 public:
  XpRows(const Args<S, A>& a, int64_t b, A* ring, int64_t first)
      : a_(a), b_(b), ring_(ring), next_(first), kRing(a.K + kRowBlock - 1) {}

  STREAMSSL_CPU_INLINE const A* row(int64_t i) {
    if constexpr (std::is_same<S, A>::value) {
      return source(i);
    } else {
      const int64_t C = a_.C;
      for (; next_ <= i; ++next_) {
        A* dst = ring_ + (next_ % kRing) * C;
        if (next_ < a_.K - 1 && a_.cache == nullptr) {
          std::memset(dst, 0, sizeof(A) * C);
        } else {
          const S* src = source(next_);
          for (int64_t c = 0; c < C; ++c) dst[c] = to_acc(src[c]);
        }
      }
      return ring_ + (i % kRing) * C;
    }
  }

 private:
  STREAMSSL_CPU_INLINE const auto* source(int64_t i) const {
    const dwconv_ln::TapSource s = dwconv_ln::tap_source(i, 0, a_.K);
    if constexpr (std::is_same<S, A>::value) {
      if (s.from_cache) {
        return a_.cache ? a_.cache + (b_ * (a_.K - 1) + s.row) * a_.C : a_.zeros;
      }
      return a_.x + (b_ * a_.T + s.row) * a_.C;
    } else {
      return s.from_cache ? a_.cache + (b_ * (a_.K - 1) + s.row) * a_.C
                          : a_.x + (b_ * a_.T + s.row) * a_.C;
    }
  }

  const Args<S, A>& a_;
  int64_t b_;
  A* ring_;
  int64_t next_;
  const int64_t kRing;
};

// sum_c f(v[c]) with kLanes partial sums combined in a fixed tree.
template <typename A, typename F>
STREAMSSL_CPU_INLINE A lane_sum(const A* v, int64_t n, F f) {
  constexpr int L = kLanes<A>;
  A s[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) s[l] += f(v[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) s[l] += f(v[i]);
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  }
  return s[0];
}

// sum_c u[c] * v[c], lanes as in lane_sum.
template <typename A>
STREAMSSL_CPU_INLINE A lane_dot(const A* u, const A* v, int64_t n) {
  constexpr int L = kLanes<A>;
  A s[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) s[l] += u[i + l] * v[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) s[l] += u[i] * v[i];
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  }
  return s[0];
}

template <typename A>
STREAMSSL_CPU_INLINE void row_stats(const A* z, int64_t C, A eps, A& mean, A& rstd) {
  mean = dwconv_ln::ln_mean(lane_sum(z, C, [](A v) { return v; }), C);
  const A m = mean;
  rstd = dwconv_ln::ln_rstd(lane_sum(z, C, [m](A v) {
                              const A d = v - m;
                              return d * d;
                            }),
                            C, eps);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Per-thread buffers: rows of accumulators and arrays of row pointers.
template <typename A>
struct Scratch {
  std::unique_ptr<A[]> buf;  // uninitialised: every row is written before it is read
  std::vector<const A*> ptrs;
  Scratch(size_t n_rows, size_t n_ptrs) : buf(new A[n_rows]), ptrs(n_ptrs) {}
  A* rows() const { return buf.get(); }
};

template <typename A>
Scratch<A> forward_scratch(int64_t C, int K) {
  // conv outputs of a row block, the xp ring; tap rows of a row block.
  return Scratch<A>(static_cast<size_t>(C) * (kRowBlock + K + kRowBlock - 1),
                    static_cast<size_t>(K + kRowBlock - 1));
}

template <typename S>
STREAMSSL_CPU_INLINE void prefetch_row(const S* row, int64_t C) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = C * static_cast<int64_t>(sizeof(S));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

// Rows [t0, t1) of batch element b, in blocks of kRowBlock frames (single frames at the end).
template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_INLINE void forward_rows(const Args<S, A>& a, int64_t b, int64_t t0, int64_t t1,
                                       Scratch<A>& scratch) {
  const int64_t C = a.C, T = a.T;
  const int K = a.K;
  A* zs = scratch.rows();  // kRowBlock rows
  A* ring = zs + kRowBlock * C;
  const A** src = scratch.ptrs.data();  // src[i] = xp row t + i
  XpRows<S, A> xp(a, b, ring, t0);
  for (int64_t t = t0; t < t1;) {
    const int n = t1 - t >= kRowBlock ? kRowBlock : 1;
    // The block reads n + K - 1 rows at once, more streams than hardware prefetchers follow:
    // ask for the next block's new rows of x now.
    for (int64_t i = t + n + K - 1; i < std::min<int64_t>(t + 2 * n + K - 1, T + K - 1); ++i) {
      prefetch_row(a.x + (b * T + i - (K - 1)) * C, C);
    }
    for (int i = 0; i < n + K - 1; ++i) src[i] = xp.row(t + i);
    auto tap = [&](int j, int r) { return src[r + j]; };
    auto out = [&](int r) { return zs + r * C; };
    if (n == kRowBlock) {
      tap_rows<kRowBlock>(tap, a.wT, a.bias, K, C, out);
    } else {
      tap_rows<1>(tap, a.wT, a.bias, K, C, out);
    }
    for (int r = 0; r < n; ++r) {
      const A* z = zs + r * C;
      A mean, rstd;
      row_stats(z, C, a.eps, mean, rstd);
      a.mean[b * T + t + r] = mean;
      a.rstd[b * T + t + r] = rstd;
      S* y = a.y + (b * T + t + r) * C;
      for (int64_t c = 0; c < C; ++c) {
        y[c] = from_acc<S>(dwconv_ln::ln_act(dwconv_ln::ln_xhat(z[c], mean, rstd), a.gamma[c],
                                             a.beta[c], kSwish));
      }
    }
    t += n;
  }
}

struct Tiling {
  int64_t rows;     // rows per tile
  int64_t per_seq;  // tiles per sequence
};

template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_INLINE void forward_tasks_body(const Args<S, A>& a, Tiling tiling, int64_t task0,
                                             int64_t task1, Scratch<A>& scratch) {
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t b = task / tiling.per_seq;
    const int64_t t0 = (task % tiling.per_seq) * tiling.rows;
    forward_rows<S, A, kSwish>(a, b, t0, std::min(t0 + tiling.rows, a.T), scratch);
  }
}

#if STREAMSSL_CPU_AVX2
template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_TARGET_AVX2 void forward_tasks_avx2(const Args<S, A>& a, Tiling tiling,
                                                  int64_t task0, int64_t task1,
                                                  Scratch<A>& scratch) {
  forward_tasks_body<S, A, kSwish>(a, tiling, task0, task1, scratch);
}
#endif

template <typename S, typename A, bool kSwish>
void forward_tasks(const Args<S, A>& a, Tiling tiling, int64_t task0, int64_t task1,
                   Scratch<A>& scratch) {
#if STREAMSSL_CPU_AVX2
  if (cpu_has_avx2()) return forward_tasks_avx2<S, A, kSwish>(a, tiling, task0, task1, scratch);
#endif
  forward_tasks_body<S, A, kSwish>(a, tiling, task0, task1, scratch);
}

// Below this many multiply-adds a call runs on the calling thread (waking the pool costs more).
constexpr int64_t kSerialWork = 1 << 16;

template <typename S, typename A, bool kSwish>
void forward_impl(const Args<S, A>& a, int64_t B) {
  const int64_t T = a.T, C = a.C;
  const int K = a.K;
  // Tiles only balance the load here (no reduction crosses rows), so they may follow the thread
  // count; a tile is long enough that its K-1 rows of halo conversion stay cheap.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_rows = 16 + 4 * static_cast<int64_t>(K - 1);
  int64_t per_seq = (4 * threads + B - 1) / B;
  per_seq = std::max<int64_t>(1, std::min(per_seq, (T + min_rows - 1) / min_rows));
  // Whole blocks of kRowBlock frames (a tile's last frames go one at a time).
  Tiling tiling{((T + per_seq - 1) / per_seq + kRowBlock - 1) / kRowBlock * kRowBlock, 0};
  tiling.per_seq = (T + tiling.rows - 1) / tiling.rows;
  const int64_t tasks = B * tiling.per_seq;
  const int64_t work_per_task = tiling.rows * C * (K + 8);
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work_per_task));
  // The first tile of each sequence also writes its new cache.
  auto run = [&](int64_t t0, int64_t t1) {
    if (a.new_cache != nullptr) {
      for (int64_t task = t0; task < t1; ++task) {
        if (task % tiling.per_seq == 0) write_new_cache(a, task / tiling.per_seq);
      }
    }
    Scratch<A> scratch = forward_scratch<A>(C, K);
    forward_tasks<S, A, kSwish>(a, tiling, t0, t1, scratch);
  };
  if (tasks <= grain) {
    run(0, tasks);
  } else {
    at::parallel_for(0, tasks, grain, run);
  }
}

// new_cache[b, k] = xp[b, T + k] for k < K-1, for one batch element.
template <typename S, typename A>
void write_new_cache(const Args<S, A>& a, int64_t b) {
  const int64_t R = a.K - 1, C = a.C, T = a.T;
  const size_t row_bytes = sizeof(S) * C;
  for (int64_t k = 0; k < R; ++k) {
    const dwconv_ln::TapSource s = dwconv_ln::tap_source(T + k, 0, a.K);
    S* dst = a.new_cache + (b * R + k) * C;
    if (!s.from_cache) {
      std::memcpy(dst, a.x + (b * T + s.row) * C, row_bytes);
    } else if (a.cache != nullptr) {
      std::memcpy(dst, a.cache + (b * R + s.row) * C, row_bytes);
    } else {
      std::memset(dst, 0, row_bytes);  // all-zero bits are +0 in every float format we take
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Partial gradients of one tile, rows of C: dw taps 0..K-1, dbias, dgamma, dbeta.
inline int64_t partial_size(int64_t C, int K) {
  return (static_cast<int64_t>(K) + 3) * C;
}

template <typename A>
Scratch<A> backward_scratch(int64_t C, int K) {
  // xp ring and dz ring (K + kRowBlock - 1 rows each), conv outputs of a row block, g, dy, dx,
  // discarded halo partials (2 rows); tap rows of xp and dz.
  const size_t ring = static_cast<size_t>(K + kRowBlock - 1);
  return Scratch<A>(static_cast<size_t>(C) * (2 * ring + kRowBlock + 5), 3 * ring);
}

// One row through the activation and the affine LayerNorm backward: z (conv output) becomes
// xhat, g = dL/dh * gamma; dgamma += dL/dh * xhat, dbeta += dL/dh. (restrict: without it g++
// gives up on the aliasing checks of seven arrays and leaves the loop scalar.)
template <typename A, bool kSwish>
STREAMSSL_CPU_INLINE void ln_act_backward_row(const A* STREAMSSL_RESTRICT dy,
                                              const A* STREAMSSL_RESTRICT gamma,
                                              const A* STREAMSSL_RESTRICT beta, A mean, A rstd,
                                              int64_t C, A* STREAMSSL_RESTRICT z,
                                              A* STREAMSSL_RESTRICT g,
                                              A* STREAMSSL_RESTRICT dgamma,
                                              A* STREAMSSL_RESTRICT dbeta) {
  for (int64_t c = 0; c < C; ++c) {
    const A xh = dwconv_ln::ln_xhat(z[c], mean, rstd);
    const A dh = dwconv_ln::act_grad(dy[c], xh, gamma[c], beta[c], kSwish);
    z[c] = xh;
    g[c] = dh * gamma[c];
    dgamma[c] += dh * xh;
    dbeta[c] += dh;
  }
}

// dw[j, c] += sum_{r < rows} dz(u + r)[c] * xp(u + r + j)[c], frames in order: a vector of
// channels at a time, so each tap's sum over the frames stays in a register.
template <typename A>
STREAMSSL_CPU_INLINE void dweight_rows(const A* const* dz_rows, int64_t ring_rows, int64_t u,
                                       const A* const* src, int rows, int K, int64_t C, A* dw) {
  constexpr int V = kVecLanes<A>;
  const A* dz[kRowBlock];
  for (int r = 0; r < rows; ++r) dz[r] = dz_rows[(u + r) % ring_rows];
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) {
    for (int j = 0; j < K; ++j) {
      Vec<A> acc{};
      for (int r = 0; r < rows; ++r) acc += vload(dz[r] + c0) * vload(src[r + j] + c0);
      vstore(dw + j * C + c0, vload(dw + j * C + c0) + acc);
    }
  }
  for (; c0 < C; ++c0) {
    for (int j = 0; j < K; ++j) {
      A acc = A(0);
      for (int r = 0; r < rows; ++r) acc += dz[r][c0] * src[r + j][c0];
      dw[j * C + c0] += acc;
    }
  }
}

// Rows [t0, t1) of batch element b: dx of these rows and their share of the parameter
// gradients (into part). Walks u = t0 .. t1 + K - 2 in blocks of kRowBlock frames: conv, then
// per frame the LayerNorm/activation backward into a ring of dz rows (the K-1 frames after the
// tile are recomputed: dx of a frame needs dz of the next K-1), then dweight of the block's own
// frames and dx of the frames whose K dz rows are complete.
template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_INLINE void backward_rows(const Args<S, A>& a, int64_t b, int64_t t0, int64_t t1,
                                        A* part, Scratch<A>& scratch) {
  const int64_t C = a.C, T = a.T;
  const int K = a.K;
  const int64_t ring_rows = K + kRowBlock - 1;
  A* ring = scratch.rows();
  A* dz_ring = ring + ring_rows * C;
  A* zs = dz_ring + ring_rows * C;  // conv outputs of the block, then xhat
  A* gbuf = zs + kRowBlock * C;
  A* dybuf = gbuf + C;
  A* dxbuf = dybuf + C;
  A* discard = dxbuf + C;  // dgamma/dbeta of halo rows, which belong to the next tile
  const A** src = scratch.ptrs.data();  // src[i] = xp row u + i
  const A** dz_rows = src + ring_rows;  // dz_rows[v % ring_rows] = dz of row v
  const A** dz_win = dz_rows + ring_rows;  // dz_win[i] = dz of row s + i (dx of a block)
  A* dw_part = part;
  A* dbias_part = part + static_cast<int64_t>(K) * C;
  XpRows<S, A> xp(a, b, ring, t0);
  const int64_t u_stop = t1 + K - 1;
  for (int64_t u = t0; u < u_stop;) {
    const int n = u_stop - u >= kRowBlock ? kRowBlock : 1;
    const int m = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, T - u)));  // rows < T
    // Next block's new rows of x and of grad_y (see forward_rows).
    for (int64_t i = u + n; i < std::min<int64_t>(u + 2 * n, T); ++i) {
      prefetch_row(a.dy + (b * T + i) * C, C);
      prefetch_row(a.x + (b * T + i) * C, C);  // xp row i + K - 1, the newest tap of frame i
    }
    if (m > 0) {
      for (int i = 0; i < m + K - 1; ++i) src[i] = xp.row(u + i);
      auto tap = [&](int j, int r) { return src[r + j]; };
      auto out = [&](int r) { return zs + r * C; };
      if (m == kRowBlock) {
        tap_rows<kRowBlock>(tap, a.wT, a.bias, K, C, out);
      } else {
        for (int r = 0; r < m; ++r) {
          tap_rows<1>([&](int j, int) { return src[r + j]; }, a.wT, a.bias, K, C,
                      [&](int) { return zs + r * C; });
        }
      }
    }
    for (int r = 0; r < n; ++r) {
      const int64_t v = u + r;
      if (r >= m) {
        dz_rows[v % ring_rows] = a.zeros;  // beyond the sequence
        continue;
      }
      A* z = zs + r * C;
      const A mean = a.mean[b * T + v], rstd = a.rstd[b * T + v];
      const S* dy_s = a.dy + (b * T + v) * C;
      const A* dy;
      if constexpr (std::is_same<S, A>::value) {
        dy = dy_s;
      } else {
        for (int64_t c = 0; c < C; ++c) dybuf[c] = to_acc(dy_s[c]);
        dy = dybuf;
      }
      const bool own = v < t1;
      A* dgamma = own ? part + static_cast<int64_t>(K + 1) * C : discard;
      A* dbeta = own ? part + static_cast<int64_t>(K + 2) * C : discard + C;
      // xhat (over z), g = dL/dh * gamma, this row's share of dgamma and dbeta; then dz.
      ln_act_backward_row<A, kSwish>(dy, a.gamma, a.beta, mean, rstd, C, z, gbuf, dgamma, dbeta);
      const A mean_g = dwconv_ln::ln_mean(lane_sum(gbuf, C, [](A q) { return q; }), C);
      const A mean_gx = dwconv_ln::ln_mean(lane_dot(gbuf, z, C), C);
      A* dz = dz_ring + (v % ring_rows) * C;
      for (int64_t i = 0; i < C; ++i) {
        dz[i] = dwconv_ln::ln_input_grad(gbuf[i], z[i], mean_g, mean_gx, rstd);
      }
      if (own) {
        for (int64_t i = 0; i < C; ++i) dbias_part[i] += dz[i];
      }
      dz_rows[v % ring_rows] = dz;
    }
    // dweight[c, j] += sum over the block's own frames of dz[v] * xp[v + j], frames in order.
    const int own_rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(m, t1 - u)));
    if (own_rows > 0) {
      dweight_rows<A>(dz_rows, ring_rows, u, src, own_rows, K, C, dw_part);
    }
    // dx[s] = sum_j w[j] dz[s + K-1 - j] for the frames s whose dz rows are all known.
    const int64_t s_lo = std::max<int64_t>(t0, u - (K - 1));
    const int64_t s_hi = u + n - (K - 1);  // exclusive
    for (int64_t s = s_lo; s < s_hi;) {
      const int k = s_hi - s >= kRowBlock ? kRowBlock : 1;
      for (int i = 0; i < k + K - 1; ++i) dz_win[i] = dz_rows[(s + i) % ring_rows];
      auto tap = [&](int j, int r) { return dz_win[r + K - 1 - j]; };
      if constexpr (std::is_same<S, A>::value) {
        auto out = [&](int r) { return a.dx + (b * T + s + r) * C; };
        if (k == kRowBlock) {
          tap_rows<kRowBlock>(tap, a.wT, static_cast<const A*>(nullptr), K, C, out);
        } else {
          tap_rows<1>(tap, a.wT, static_cast<const A*>(nullptr), K, C, out);
        }
      } else {
        for (int r = 0; r < k; ++r) {
          tap_rows<1>([&](int j, int) { return tap(j, r); }, a.wT, static_cast<const A*>(nullptr), K,
                      C, [&](int) { return dxbuf; });
          S* dx = a.dx + (b * T + s + r) * C;
          for (int64_t c = 0; c < C; ++c) dx[c] = from_acc<S>(dxbuf[c]);
        }
      }
      s += k;
    }
    u += n;
  }
}

template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_INLINE void backward_tasks_body(const Args<S, A>& a, Tiling tiling, int64_t task0,
                                              int64_t task1, A* partials, Scratch<A>& scratch) {
  const int64_t P = partial_size(a.C, a.K);
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t b = task / tiling.per_seq;
    const int64_t t0 = (task % tiling.per_seq) * tiling.rows;
    A* part = partials + task * P;
    for (int64_t i = 0; i < P; ++i) part[i] = A(0);
    backward_rows<S, A, kSwish>(a, b, t0, std::min(t0 + tiling.rows, a.T), part, scratch);
  }
}

#if STREAMSSL_CPU_AVX2
template <typename S, typename A, bool kSwish>
STREAMSSL_CPU_TARGET_AVX2 void backward_tasks_avx2(const Args<S, A>& a, Tiling tiling,
                                                   int64_t task0, int64_t task1, A* partials,
                                                   Scratch<A>& scratch) {
  backward_tasks_body<S, A, kSwish>(a, tiling, task0, task1, partials, scratch);
}
#endif

template <typename S, typename A, bool kSwish>
void backward_tasks(const Args<S, A>& a, Tiling tiling, int64_t task0, int64_t task1,
                    A* partials, Scratch<A>& scratch) {
#if STREAMSSL_CPU_AVX2
  if (cpu_has_avx2()) {
    return backward_tasks_avx2<S, A, kSwish>(a, tiling, task0, task1, partials, scratch);
  }
#endif
  backward_tasks_body<S, A, kSwish>(a, tiling, task0, task1, partials, scratch);
}

// Time tiling of the backward: a function of the shapes only (never of the thread count), so
// that the tile-ordered sum of the parameter gradients is reproducible everywhere. Tiles are at
// least 128 rows and 16 halos long (the halo is recomputed) and there are at most ~256 + B of
// them (the partials stay small).
Tiling backward_tiling(int64_t B, int64_t T, int K) {
  const int64_t min_rows = std::max<int64_t>(128, 16 * static_cast<int64_t>(K - 1));
  const int64_t rows =
      (std::max<int64_t>({min_rows, (B * T + 255) / 256, 1}) + kRowBlock - 1) / kRowBlock * kRowBlock;
  Tiling t{std::min(rows, std::max<int64_t>(T, 1)), 0};
  t.per_seq = (T + t.rows - 1) / t.rows;
  return t;
}

template <typename A, typename P>
void store_param_grad(const A* src, int64_t n, at::Tensor& out) {
  P* o = out.data_ptr<P>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<P>(src[i]);
}

// Writes one parameter gradient (contiguous, n elements) from the reduced accumulation buffer.
template <typename A>
void store_grad(const A* src, int64_t n, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "causal_dwconv_ln_grad", [&] {
    store_param_grad<A, scalar_t>(src, n, out);
  });
}

template <typename S, typename A, bool kSwish>
void backward_impl(const Args<S, A>& a, int64_t B, at::Tensor& grad_weight, at::Tensor& grad_bias,
                   at::Tensor& grad_ln_weight, at::Tensor& grad_ln_bias) {
  const int64_t C = a.C, T = a.T;
  const int K = a.K;
  const Tiling tiling = backward_tiling(B, T, K);
  const int64_t tasks = B * tiling.per_seq;
  const int64_t P = partial_size(C, K);
  std::vector<A> partials(static_cast<size_t>(std::max<int64_t>(tasks, 1) * P), A(0));
  const int64_t work_per_task = (tiling.rows + K - 1) * C * (3 * K + 16);
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work_per_task));
  if (tasks <= grain) {
    Scratch<A> scratch = backward_scratch<A>(C, K);
    backward_tasks<S, A, kSwish>(a, tiling, 0, tasks, partials.data(), scratch);
  } else {
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      Scratch<A> scratch = backward_scratch<A>(C, K);
      backward_tasks<S, A, kSwish>(a, tiling, t0, t1, partials.data(), scratch);
    });
  }
  // Sum the tiles in tile order (parallel over channels only; the order within a sum is fixed).
  std::vector<A> total(static_cast<size_t>(P), A(0));
  at::parallel_for(0, P, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t task = 0; task < tasks; ++task) {
      const A* p = partials.data() + task * P;
      for (int64_t e = e0; e < e1; ++e) total[e] += p[e];
    }
  });
  // dweight back to (C, K).
  std::vector<A> dw(static_cast<size_t>(K * C));
  for (int64_t c = 0; c < C; ++c) {
    for (int j = 0; j < K; ++j) dw[c * K + j] = total[static_cast<int64_t>(j) * C + c];
  }
  store_grad(dw.data(), K * C, grad_weight);
  store_grad(total.data() + static_cast<int64_t>(K) * C, C, grad_bias);
  store_grad(total.data() + static_cast<int64_t>(K + 1) * C, C, grad_ln_weight);
  store_grad(total.data() + static_cast<int64_t>(K + 2) * C, C, grad_ln_bias);
}

template <typename S, typename A>
Args<S, A> make_args(const at::Tensor& x, const std::optional<at::Tensor>& cache,
                     const PackedParams<A>& p, int K) {
  Args<S, A> a{};
  a.x = x.data_ptr<S>();
  a.cache = (cache.has_value() && K > 1) ? cache->data_ptr<S>() : nullptr;
  a.wT = p.wT;
  a.bias = p.bias;
  a.gamma = p.gamma;
  a.beta = p.beta;
  a.zeros = p.zeros;
  a.T = x.size(1);
  a.C = x.size(2);
  a.K = K;
  return a;
}

}  // namespace

void causal_dwconv_ln_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                              const at::Tensor& ln_bias, const std::optional<at::Tensor>& cache,
                              double eps, bool swish, at::Tensor& y, at::Tensor& new_cache,
                              at::Tensor& mean, at::Tensor& rstd) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int K = static_cast<int>(weight.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_dwconv_ln_cpu", [&] {
    using S = scalar_t;
    using A = typename AccOf<S>::type;
    if (B == 0) return;
    const PackedParams<A> p = pack_params<A>(weight, bias, ln_weight, ln_bias);
    Args<S, A> a = make_args<S, A>(x, cache, p, K);
    a.new_cache = K > 1 ? new_cache.data_ptr<S>() : nullptr;
    if (T == 0) {
      for (int64_t b = 0; a.new_cache != nullptr && b < B; ++b) write_new_cache(a, b);
      return;
    }
    a.eps = static_cast<A>(eps);
    a.y = y.data_ptr<S>();
    a.mean = mean.data_ptr<A>();
    a.rstd = rstd.data_ptr<A>();
    if (swish) {
      forward_impl<S, A, true>(a, B);
    } else {
      forward_impl<S, A, false>(a, B);
    }
  });
}

void causal_dwconv_ln_backward(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                               const std::optional<at::Tensor>& cache, const at::Tensor& mean,
                               const at::Tensor& rstd, bool swish, at::Tensor& grad_x,
                               at::Tensor& grad_weight, at::Tensor& grad_bias,
                               at::Tensor& grad_ln_weight, at::Tensor& grad_ln_bias) {
  const int64_t B = x.size(0);
  const int K = static_cast<int>(weight.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_dwconv_ln_backward_cpu", [&] {
    using S = scalar_t;
    using A = typename AccOf<S>::type;
    const PackedParams<A> p = pack_params<A>(weight, bias, ln_weight, ln_bias);
    Args<S, A> a = make_args<S, A>(x, cache, p, K);
    a.mean = const_cast<A*>(mean.data_ptr<A>());
    a.rstd = const_cast<A*>(rstd.data_ptr<A>());
    a.dy = grad_y.data_ptr<S>();
    a.dx = grad_x.data_ptr<S>();
    if (swish) {
      backward_impl<S, A, true>(a, B, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias);
    } else {
      backward_impl<S, A, false>(a, B, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias);
    }
  });
}

}  // namespace cpu
}  // namespace streamssl
