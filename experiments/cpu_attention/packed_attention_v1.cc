// The first version of the CPU attention kernel (commit 8bebc52 .. 1f37ae1~1), kept as the
// reference `kernel_ab.py` times the library's kernel against: per query row, its scores and
// output accumulated in memory, the backward row-major with dk / dv written per (row, key).

// Masked softmax attention on the CPU, skipping keys a query cannot see (XLA FFI handlers).
//
// q [B, K, G, T, H], k and v [B, K, S, H] float32, visible [B, T, S] bool (the mask is shared
// by the K x G heads). Forward: out [B, K, G, T, H] and lse [B, K, G, T] (log-sum-exp of the
// scaled visible scores; -inf for a query that sees nothing, whose output is the mean of all S
// values, as a softmax of equal scores gives). Backward: dq, dk, dv from q, k, v, visible, out,
// lse and dout. Keys are visited in tiles of 16; a tile with no visible key is skipped, so the
// work follows the visible pairs, not T x S.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;
typedef float Vec __attribute__((vector_size(kTile * sizeof(float))));  // one tile of keys

inline Vec LoadVec(const float* p) {
  Vec x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
constexpr float kMasked = -1e30f;  // a masked score: its exponential underflows to exactly 0

// exp(x) for x <= 0 (exact 0 below -87.3), within ~2 ulp of std::exp; written so that loops
// over it vectorize (2^n scaled by the exponent bits, a degree-6 polynomial for 2^f).
inline float Exp(float x) {
  const bool zero = x < -87.0f;
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  const float f = t - n;  // [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return zero ? 0.0f : p * scale;
}

struct Dims {
  int64_t B, K, G, T, S, H;
};

// Runs fn(i) for i in [0, n) on the caller and up to pool.num_threads() - 1 helpers; returns
// when every i has run.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::function<void(int64_t)> fn;
    int64_t n;
  };
  auto st = std::make_shared<State>();
  st->fn = fn;
  st->n = n;
  auto work = [st]() {
    for (int64_t i = st->next.fetch_add(1); i < st->n; i = st->next.fetch_add(1)) {
      st->fn(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Tiles of keys [0, S) holding at least one visible key for this query row (a whole tile's
// 16 one-byte flags tested as two 64-bit words).
int64_t VisibleTiles(const bool* vis, int64_t S, int64_t* tiles) {
  static_assert(kTile == 16 && sizeof(bool) == 1, "a tile's flags are two 64-bit words");
  int64_t n = 0, j0 = 0;
  for (; j0 + kTile <= S; j0 += kTile) {
    uint64_t lo, hi;
    std::memcpy(&lo, vis + j0, 8);
    std::memcpy(&hi, vis + j0 + 8, 8);
    if (lo | hi) tiles[n++] = j0;
  }
  if (j0 < S) {
    bool any = false;
    for (int64_t j = j0; j < S; ++j) any |= vis[j];
    if (any) tiles[n++] = j0;
  }
  return n;
}

// Scaled scores of one tile of keys [j0, j0 + kTile) (kMasked where not visible or past S) from
// xt [H, S] (keys or values transposed) and the query row xv [H]: out[j] = scale * xv . x_j.
inline void TileDots(const float* xv, const float* xt, int64_t S, int64_t H, int64_t j0,
                     float* out) {
  float acc[kTile] = {0};
  const int64_t w = std::min(kTile, S - j0);
  if (w == kTile) {
    Vec a = {0};
    for (int64_t h = 0; h < H; ++h) a += xv[h] * LoadVec(xt + h * S + j0);
    std::memcpy(acc, &a, sizeof(a));
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < w; ++j) acc[j] += xv[h] * xt[h * S + j0 + j];
  }
  std::memcpy(out, acc, sizeof(acc));
}

// Scores of the visited tiles into sc (tile-major, kTile per tile; kMasked where not visible);
// returns their max.
float Scores(const float* qv, const float* kt, const bool* vis, const int64_t* tiles,
             int64_t ntiles, const Dims& d, float scale, float* sc) {
  float m = kMasked;
  for (int64_t ti = 0; ti < ntiles; ++ti) {
    const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
    float* st = sc + ti * kTile;
    TileDots(qv, kt, d.S, d.H, j0, st);
    for (int64_t j = 0; j < kTile; ++j) {
      const bool on = j < w && vis[j0 + j];
      st[j] = on ? st[j] * scale : kMasked;
      m = std::max(m, st[j]);
    }
  }
  return m;
}

void Transpose(const float* x, int64_t S, int64_t H, float* xt) {  // [S, H] -> [H, S]
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) xt[h * S + s] = x[s * H + h];
}

void Forward(const Dims& d, const float* q, const float* k, const float* v, const bool* visible,
             float* out, float* lse, int64_t bk) {
  const int64_t b = bk / d.K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const float* kb = k + bk * d.S * d.H;
  const float* vb = v + bk * d.S * d.H;
  const int64_t max_tiles = (d.S + kTile - 1) / kTile;
  std::vector<float> kt(d.H * d.S), sc(max_tiles * kTile), o(d.H);
  std::vector<int64_t> tiles(max_tiles);
  Transpose(kb, d.S, d.H, kt.data());
  std::vector<float> mean(d.H, 0.0f);
  bool mean_ready = false;
  for (int64_t t = 0; t < d.T; ++t) {
    const bool* vis = visible + (b * d.T + t) * d.S;
    const int64_t ntiles = VisibleTiles(vis, d.S, tiles.data());
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t row = ((bk * d.G) + g) * d.T + t;
      const float* qv = q + row * d.H;
      float* orow = out + row * d.H;
      if (ntiles == 0) {  // sees nothing: the mean of all values
        if (!mean_ready) {
          for (int64_t s = 0; s < d.S; ++s)
            for (int64_t h = 0; h < d.H; ++h) mean[h] += vb[s * d.H + h];
          for (int64_t h = 0; h < d.H; ++h) mean[h] /= static_cast<float>(d.S);
          mean_ready = true;
        }
        std::copy(mean.begin(), mean.end(), orow);
        lse[row] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float m = Scores(qv, kt.data(), vis, tiles.data(), ntiles, d, scale, sc.data());
      std::fill(o.begin(), o.end(), 0.0f);
      float l = 0.0f;
      for (int64_t ti = 0; ti < ntiles; ++ti) {
        const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
        float p[kTile];
        const float* st = sc.data() + ti * kTile;
        for (int64_t j = 0; j < kTile; ++j) p[j] = Exp(st[j] - m);
        for (int64_t j = 0; j < kTile; ++j) l += p[j];
        for (int64_t j = 0; j < w; ++j) {
          const float pj = p[j];
          const float* vr = vb + (j0 + j) * d.H;
#pragma GCC ivdep
          for (int64_t h = 0; h < d.H; ++h) o[h] += pj * vr[h];
        }
      }
      const float inv = 1.0f / l;
      for (int64_t h = 0; h < d.H; ++h) orow[h] = o[h] * inv;
      lse[row] = m + std::log(l);
    }
  }
}

void Backward(const Dims& d, const float* q, const float* k, const float* v, const bool* visible,
              const float* out, const float* lse, const float* dout, float* dq, float* dk,
              float* dv, int64_t bk) {
  const int64_t b = bk / d.K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const float* kb = k + bk * d.S * d.H;
  const float* vb = v + bk * d.S * d.H;
  float* dkb = dk + bk * d.S * d.H;
  float* dvb = dv + bk * d.S * d.H;
  std::fill(dkb, dkb + d.S * d.H, 0.0f);
  std::fill(dvb, dvb + d.S * d.H, 0.0f);
  const int64_t max_tiles = (d.S + kTile - 1) / kTile;
  std::vector<float> kt(d.H * d.S), vt(d.H * d.S), sc(max_tiles * kTile), gq(d.H);
  std::vector<int64_t> tiles(max_tiles);
  Transpose(kb, d.S, d.H, kt.data());
  Transpose(vb, d.S, d.H, vt.data());
  for (int64_t t = 0; t < d.T; ++t) {
    const bool* vis = visible + (b * d.T + t) * d.S;
    const int64_t ntiles = VisibleTiles(vis, d.S, tiles.data());
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t row = ((bk * d.G) + g) * d.T + t;
      const float* qv = q + row * d.H;
      const float* go = dout + row * d.H;
      float* gqrow = dq + row * d.H;
      if (ntiles == 0) {  // uniform over all S keys: only dv, dout / S each
        std::fill(gqrow, gqrow + d.H, 0.0f);
        const float inv = 1.0f / static_cast<float>(d.S);
        for (int64_t s = 0; s < d.S; ++s)
          for (int64_t h = 0; h < d.H; ++h) dvb[s * d.H + h] += go[h] * inv;
        continue;
      }
      Scores(qv, kt.data(), vis, tiles.data(), ntiles, d, scale, sc.data());
      const float* ov = out + row * d.H;
      float D = 0.0f;
      for (int64_t h = 0; h < d.H; ++h) D += go[h] * ov[h];
      const float ls = lse[row];
      std::fill(gq.begin(), gq.end(), 0.0f);
      for (int64_t ti = 0; ti < ntiles; ++ti) {
        const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
        const float* st = sc.data() + ti * kTile;
        float p[kTile], dp[kTile], ds[kTile];
        for (int64_t j = 0; j < kTile; ++j) p[j] = Exp(st[j] - ls);
        TileDots(go, vt.data(), d.S, d.H, j0, dp);
        for (int64_t j = 0; j < kTile; ++j) ds[j] = p[j] * (dp[j] - D) * scale;
        for (int64_t j = 0; j < w; ++j) {
          const float pj = p[j], dsj = ds[j];
          const float* kr = kb + (j0 + j) * d.H;
          float* gv = dvb + (j0 + j) * d.H;
          float* gk = dkb + (j0 + j) * d.H;
#pragma GCC ivdep
          for (int64_t h = 0; h < d.H; ++h) {
            gv[h] += pj * go[h];
            gq[h] += dsj * kr[h];
            gk[h] += dsj * qv[h];
          }
        }
      }
      std::copy(gq.begin(), gq.end(), gqrow);
    }
  }
}

Dims DimsOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  return Dims{qd[0], qd[1], qd[2], qd[3], kd[2], qd[4]};
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> visible,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() != 5 || k.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("packed attention: q [B,K,G,T,H], k [B,K,S,H]");
  const Dims d = DimsOf(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* vis = visible.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, d.B * d.K,
              [&](int64_t bk) { Forward(d, qp, kp, vp, vis, op, lp, bk); });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> visible,
                   ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = DimsOf(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* vis = visible.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, d.B * d.K, [&](int64_t bk) {
    Backward(d, qp, kp, vp, vis, op, lp, gp, dqp, dkp, dvp, bk);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPackedAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPackedAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
