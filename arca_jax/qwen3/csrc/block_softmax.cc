// The softmax statistics an inverse-CDF draw over the vocabulary needs, in one pass over the
// logits (an XLA FFI handler): per row its max, and per block of `block` tokens the sum of
// exp((x - max) / temperature); with them the row's untempered total sum(exp(x - max)).
//
// x [B, V] float32; max [B]; sums [B, C] (C = ceil(V / block); the last block may be short);
// total [B]. A row is cut in segments of whole blocks (one task each, split over XLA's CPU thread
// pool); a segment's sums are taken against its own max and rescaled by exp((m_s - max) / t)
// once every segment is done. The exponential is the kernels' (`vec16.h` ExpN, within ~2 ulp of
// std::exp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using arca_jax::ExpN;
using arca_jax::kLanes;
using arca_jax::LoadN;
using arca_jax::NVec;
using arca_jax::SplatN;

constexpr int64_t kSegment = 16384;  // tokens per task, about
constexpr double kSmall = 1 << 16;   // tokens (B V) below which one thread runs the call

float MaxOfRange(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
  if (n >= kLanes) {
    NVec mv = LoadN(x);
    for (v = kLanes; v + kLanes <= n; v += kLanes) {
      const NVec y = LoadN(x + v);
      mv = y > mv ? y : mv;
    }
    for (int j = 0; j < kLanes; ++j) m = std::max(m, mv[j]);
  }
  for (; v < n; ++v) m = std::max(m, x[v]);
  return m;
}

// sum over [0, n) of exp(x - m), or of exp((x - m) / t) when kDivide
template <bool kDivide>
float ExpSum(const float* x, int64_t n, float m, float t) {
  NVec a0{}, a1{};
  const NVec mv = SplatN(m), tv = SplatN(t);
  int64_t v = 0;
  for (; v + 2 * kLanes <= n; v += 2 * kLanes) {
    NVec y0 = LoadN(x + v) - mv, y1 = LoadN(x + v + kLanes) - mv;
    if constexpr (kDivide) {
      y0 = y0 / tv;
      y1 = y1 / tv;
    }
    a0 += ExpN(y0);
    a1 += ExpN(y1);
  }
  const NVec a = a0 + a1;
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += a[j];
  for (; v < n; ++v) s += std::exp(kDivide ? (x[v] - m) / t : x[v] - m);
  return s;
}

ffi::Error BlockSoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, float temperature,
                            int64_t block, ffi::ResultBuffer<ffi::F32> max,
                            ffi::ResultBuffer<ffi::F32> sums, ffi::ResultBuffer<ffi::F32> total) {
  const auto xd = x.dimensions(), sd = sums->dimensions();
  if (xd.size() != 2 || block <= 0 || sd.size() != 2 || sd[0] != xd[0] ||
      sd[1] != (xd[1] + block - 1) / block || max->element_count() != xd[0] ||
      total->element_count() != xd[0] || !(temperature > 0.0f)) {
    return ffi::Error::InvalidArgument(
        "block softmax: x [B, V], max [B], sums [B, ceil(V / block)], total [B], temperature > 0");
  }
  const int64_t B = xd[0], V = xd[1], C = sd[1];
  const float* xp = x.typed_data();
  float* mp = max->typed_data();
  float* sp = sums->typed_data();
  float* tp = total->typed_data();
  const bool tempered = temperature != 1.0f;
  const int64_t per = std::max<int64_t>(1, kSegment / block);  // blocks per segment
  const int64_t segments = (C + per - 1) / per;
  std::vector<float> seg_max(B * segments), seg_total(B * segments);
  auto task = [&](int64_t i) {
    const int64_t b = i / segments, s = i % segments;
    const float* row = xp + b * V;
    const int64_t c0 = s * per, c1 = std::min(C, c0 + per);
    const int64_t v0 = c0 * block, v1 = std::min(V, c1 * block);
    const float m = MaxOfRange(row + v0, v1 - v0);
    float untempered = 0.0f;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * block, n = std::min(V, a + block) - a;
      if (tempered) {
        sp[b * C + c] = ExpSum<true>(row + a, n, m, temperature);
        untempered += ExpSum<false>(row + a, n, m, 1.0f);
      } else {
        sp[b * C + c] = ExpSum<false>(row + a, n, m, 1.0f);
        untempered += sp[b * C + c];
      }
    }
    seg_max[i] = m;
    seg_total[i] = untempered;
  };
  arca_jax::ForEach(pool, B * segments, static_cast<double>(B) * V < kSmall, task);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    float m = kNegInf;
    for (int64_t s = 0; s < segments; ++s) m = std::max(m, seg_max[b * segments + s]);
    float t = 0.0f;
    for (int64_t s = 0; s < segments; ++s) {
      const float ms = seg_max[b * segments + s];
      if (segments > 1 && ms != m) {  // rescale the segment's sums to the row's max
        const float k = ms == kNegInf ? 0.0f : std::exp((ms - m) / temperature);
        const float k1 = ms == kNegInf ? 0.0f : std::exp(ms - m);
        for (int64_t c = s * per; c < std::min(C, (s + 1) * per); ++c) sp[b * C + c] *= k;
        t += seg_total[b * segments + s] * k1;
      } else {
        t += seg_total[b * segments + s];
      }
    }
    mp[b] = m;
    tp[b] = t;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaBlockSoftmax, BlockSoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("temperature")
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
