// CPU kernel of the subsampling stem's fused backward (csrc/common/subsampling_stem_math.h).
//
// Work is split into tiles of kTileRows stage-0 frames (b, i); a tile walks its frames' bins j
// and, for every channel at once (the innermost, contiguous loop, vectorised), gathers stage 1's
// gradient through the taps that read y0[b, i, j], gates it with the ReLU, and adds the tile's
// partial sums of all 19 parameter gradients. The partials are then summed over tiles in tile
// order, so the result does not depend on how at::parallel_for spreads the tiles.
#include "cpu/subsampling_stem.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/subsampling_stem_math.h"
#include "cpu/cpu_dispatch.h"

namespace streamssl {
namespace cpu {
namespace {

namespace m = ::streamssl::stem;

constexpr int64_t kTileRows = 16;

template <typename S>
struct StemArgs {
  const S* g1;
  const S* y0;
  const S* feats;
  const S* w1t;  // (9, C): tap-major, so a tap's weights are contiguous over channels
  m::Shape s;
};

// One stage-0 position (b, i, j), all channels: acc receives the gated g0 on return.
template <typename S>
STREAMSSL_CPU_INLINE void position(const StemArgs<S>& a, int64_t b, int64_t i, int64_t j,
                                   S* __restrict__ acc, S* __restrict__ part) {
  const m::Shape& s = a.s;
  const int64_t C = s.C;
  const S* __restrict__ y = a.y0 + ((b * s.T0 + i) * s.F0 + j) * C;
  std::fill(acc, acc + C, S(0));
  const bool fed = m::for_each_reader(i, j, s.pad, s.T1, s.F1, [&](int tap, int64_t o, int64_t q) {
    const S* __restrict__ g = a.g1 + ((b * s.T1 + o) * s.F1 + q) * C;
    const S* __restrict__ w = a.w1t + tap * C;
    S* __restrict__ gw = part + (m::kGradW1 + tap) * C;
    for (int64_t c = 0; c < C; ++c) {
      // Through locals: the vectoriser sees two independent streams, not two aliased references.
      S a_c = acc[c], gw_c = gw[c];
      m::tap_update(w[c], y[c], g[c], a_c, gw_c);
      acc[c] = a_c;
      gw[c] = gw_c;
    }
  });
  if (!fed) return;  // no stage-1 output reads this position: g0 = 0
  S* __restrict__ gb = part + m::kGradB0 * C;
  for (int64_t c = 0; c < C; ++c) {
    acc[c] = m::relu_gate(acc[c], y[c]);
    gb[c] += acc[c];
  }
  m::for_each_input(i, j, s.pad, s.T, s.F, [&](int tap, int64_t t, int64_t f) {
    const S v = a.feats[(b * s.T + t) * s.F + f];
    S* __restrict__ gw = part + (m::kGradW0 + tap) * C;
    for (int64_t c = 0; c < C; ++c) gw[c] += acc[c] * v;
  });
}

template <typename S>
STREAMSSL_CPU_INLINE void tiles_body(const StemArgs<S>& a, int64_t tile0, int64_t tile1, S* parts) {
  const int64_t C = a.s.C, rows = a.s.B * a.s.T0;
  std::vector<S> acc(C);
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    S* part = parts + tile * m::kPartials * C;
    std::fill(part, part + m::kPartials * C, S(0));
    for (int64_t r = tile * kTileRows; r < std::min(rows, (tile + 1) * kTileRows); ++r) {
      for (int64_t j = 0; j < a.s.F0; ++j) position(a, r / a.s.T0, r % a.s.T0, j, acc.data(), part);
    }
  }
}

template <typename S>
void tiles_baseline(const StemArgs<S>& a, int64_t tile0, int64_t tile1, S* parts) {
  tiles_body(a, tile0, tile1, parts);
}

#if STREAMSSL_CPU_AVX2
template <typename S>
STREAMSSL_CPU_TARGET_AVX2 void tiles_avx2(const StemArgs<S>& a, int64_t tile0, int64_t tile1, S* parts) {
  tiles_body(a, tile0, tile1, parts);
}
#endif

template <typename S>
void run(const at::Tensor& grad_y1, const at::Tensor& y0, const at::Tensor& feats,
         const at::Tensor& w1, int64_t pad, at::Tensor& grad_w0, at::Tensor& grad_b0,
         at::Tensor& grad_w1) {
  const int64_t C = y0.size(3);
  const m::Shape s = m::make_shape(y0.size(0), feats.size(1), feats.size(2), C, pad);
  const at::Tensor w1t = w1.reshape({C, m::kTaps}).t().contiguous();
  const StemArgs<S> a{grad_y1.data_ptr<S>(), y0.data_ptr<S>(), feats.data_ptr<S>(), w1t.data_ptr<S>(), s};
  const int64_t tiles = (s.B * s.T0 + kTileRows - 1) / kTileRows;
  // Not zeroed here: every tile clears its own partials before adding to them.
  const std::unique_ptr<S[]> parts(new S[static_cast<size_t>(std::max<int64_t>(tiles, 1) * m::kPartials * C)]);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
#if STREAMSSL_CPU_AVX2
    if (cpu_has_avx2()) return tiles_avx2(a, t0, t1, parts.get());
#endif
    tiles_baseline(a, t0, t1, parts.get());
  });
  // Tile order, whatever the threads did: each (k, c) adds its tiles' partials one after another
  // (rows of C contiguous values, so the adds vectorise over channels).
  std::vector<S> sums(static_cast<size_t>(m::kPartials * C), S(0));
  at::parallel_for(0, m::kPartials, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      S* __restrict__ sum = sums.data() + k * C;
      for (int64_t t = 0; t < tiles; ++t) {
        const S* __restrict__ part = parts.get() + (t * m::kPartials + k) * C;
        for (int64_t c = 0; c < C; ++c) sum[c] += part[c];
      }
    }
  });
  S* gw0 = grad_w0.data_ptr<S>();
  S* gb0 = grad_b0.data_ptr<S>();
  S* gw1 = grad_w1.data_ptr<S>();
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < m::kTaps; ++k) {
      gw0[c * m::kTaps + k] = sums[(m::kGradW0 + k) * C + c];
      gw1[c * m::kTaps + k] = sums[(m::kGradW1 + k) * C + c];
    }
    gb0[c] = sums[m::kGradB0 * C + c];
  }
}

}  // namespace

void subsampling_stem_backward(const at::Tensor& grad_y1, const at::Tensor& y0,
                               const at::Tensor& feats, const at::Tensor& w1, int64_t pad,
                               at::Tensor& grad_w0, at::Tensor& grad_b0, at::Tensor& grad_w1) {
  if (y0.scalar_type() == at::kDouble) {
    run<double>(grad_y1, y0, feats, w1, pad, grad_w0, grad_b0, grad_w1);
  } else {
    run<float>(grad_y1, y0, feats, w1, pad, grad_w0, grad_b0, grad_w1);
  }
}

}  // namespace cpu
}  // namespace streamssl
