// One row's attention of one new token over a kv head's cache on the CPU (included by
// decode_attention.cc and decode_layer.cc): `Attend` below; the layouts are decode_attention.cc's.
#ifndef ARCA_JAX_ATTEND_ROW_H_
#define ARCA_JAX_ATTEND_ROW_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace arca_jax {
namespace attend_row {

constexpr float kMasked = -1e30f;  // below this a score counts as masked

// The first `count` (<= 16) floats at p, zeros after.
inline Vec LoadPart(const float* p, int64_t count) {
  float tmp[kTile] = {};
  std::memcpy(tmp, p, count * sizeof(float));
  return Load(tmp);
}

// out[g] = sum over i < n of a[g][i] * b[i] for GC rows of a (`astride` apart) and 16 columns
// of b (rows `bstride` apart, 16 readable floats each) -> out [GC, 16]; even and odd i summed
// apart. Scores: a = q [GC, H], b = the key tile [H, 16]; weighted values: a = the
// probabilities [GC, n], b = 16 lanes of v [n, H].
template <int GC>
inline void Combine(const float* a, int64_t astride, const float* b, int64_t bstride, int64_t n,
                    float* out) {
  NVec x[GC][kParts], y[GC][kParts];
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < kParts; ++j) x[g][j] = y[g][j] = NVec{};
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    NVec b0[kParts], b1[kParts];
    for (int j = 0; j < kParts; ++j) {
      b0[j] = LoadN(b + i * bstride + j * kLanes);
      b1[j] = LoadN(b + (i + 1) * bstride + j * kLanes);
    }
    for (int g = 0; g < GC; ++g) {
      const float a0 = a[g * astride + i], a1 = a[g * astride + i + 1];
      for (int j = 0; j < kParts; ++j) {
        x[g][j] += a0 * b0[j];
        y[g][j] += a1 * b1[j];
      }
    }
  }
  if (i < n) {
    for (int g = 0; g < GC; ++g)
      for (int j = 0; j < kParts; ++j) x[g][j] += a[g * astride + i] * LoadN(b + i * bstride + j * kLanes);
  }
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < kParts; ++j) StoreN(out + g * kTile + j * kLanes, x[g][j] + y[g][j]);
}

// GC heads of one (row, kv head): q [GC, H], k [H, S], v [S, H], bias [S] -> out [GC, H] over
// slots [0, n). sc: scratch of GC x `padded` floats; tail: scratch of H x 16 floats.
template <int GC>
void AttendHeads(const float* q, const float* k, const float* v, const float* bias, float* out,
                 int64_t H, int64_t S, int64_t n, float* sc, int64_t padded, float* tail) {
  const int64_t full = n / kTile;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  float s[GC * kTile];
  for (int64_t t = 0; t < full; ++t) {
    Combine<GC>(q, H, k + t * kTile, S, H, s);
    const Vec b = Load(bias + t * kTile);
    for (int g = 0; g < GC; ++g) Store(sc + g * padded + t * kTile, Load(s + g * kTile) * scale + b);
  }
  if (const int64_t rest = n - full * kTile; rest > 0) {  // the last slots, zero-padded
    for (int64_t h = 0; h < H; ++h) Store(tail + h * kTile, LoadPart(k + h * S + full * kTile, rest));
    Combine<GC>(q, H, tail, kTile, H, s);
    const Vec b = LoadPart(bias + full * kTile, rest);
    for (int g = 0; g < GC; ++g) {
      float* x = sc + g * padded + full * kTile;
      Store(x, Load(s + g * kTile) * scale + b);
      for (int64_t j = rest; j < kTile; ++j) x[j] = -INFINITY;  // past n: weight 0
    }
  }
  const int64_t tiles = padded / kTile;
  float inv[GC];
  for (int g = 0; g < GC; ++g) {
    float* pg = sc + g * padded;
    float m = -INFINITY;
    for (int64_t t = 0; t < tiles; ++t) m = std::max(m, MaxOf(Load(pg + t * kTile)));
    float total = 0.0f;
    if (m < kMasked) {  // sees nothing: equal weights over the n slots
      for (int64_t j = 0; j < padded; ++j) pg[j] = j < n ? 1.0f : 0.0f;
      total = static_cast<float>(n);
    } else {
      for (int64_t t = 0; t < tiles; ++t) {
        const Vec e = Exp(Load(pg + t * kTile) - m);
        Store(pg + t * kTile, e);
        total += SumOf(e);
      }
    }
    inv[g] = 1.0f / total;
  }
  float o[GC * kTile];
  for (int64_t h0 = 0; h0 < H; h0 += kTile) {
    const int64_t count = std::min(kTile, H - h0);
    if (count == kTile) {
      Combine<GC>(sc, padded, v + h0, H, n, o);
    } else {  // lanes past H: read a zero-padded copy of the columns
      for (int64_t j = 0; j < n; ++j) Store(tail + j * kTile, LoadPart(v + j * H + h0, count));
      Combine<GC>(sc, padded, tail, kTile, n, o);
    }
    for (int g = 0; g < GC; ++g)
      for (int64_t j = 0; j < count; ++j) out[g * H + h0 + j] = o[g * kTile + j] * inv[g];
  }
}

// One (row, kv head): q [G, H], k [H, S], v [S, H], bias [S] -> out [G, H], heads two at a
// time (their accumulators fill the AVX2 registers), four with AVX-512.
constexpr int kHeads = kParts == 1 ? 4 : 2;

inline void Attend(const float* q, const float* k, const float* v, const float* bias, float* out,
            int64_t G, int64_t H, int64_t S, int64_t n, std::vector<float>& scratch) {
  const int64_t padded = (n + kTile - 1) / kTile * kTile;
  scratch.resize(kHeads * padded + std::max(H, n) * kTile);
  float* sc = scratch.data();
  float* tail = sc + kHeads * padded;
  int64_t g = 0;
  for (; g + kHeads <= G; g += kHeads)
    AttendHeads<kHeads>(q + g * H, k, v, bias, out + g * H, H, S, n, sc, padded, tail);
  if (kHeads == 4 && G - g >= 2) {
    AttendHeads<2>(q + g * H, k, v, bias, out + g * H, H, S, n, sc, padded, tail);
    g += 2;
  }
  if (g < G) AttendHeads<1>(q + g * H, k, v, bias, out + g * H, H, S, n, sc, padded, tail);
}

}  // namespace attend_row

using attend_row::Attend;

}  // namespace arca_jax

#endif  // ARCA_JAX_ATTEND_ROW_H_
