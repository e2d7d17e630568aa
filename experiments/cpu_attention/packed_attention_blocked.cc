// A variant under study, not built by the library: arca_jax/qwen3/csrc/packed_attention.cc with
// blocks of 8 queries sharing their visited key tiles (ForwardBlocked / BackwardBlocked, head sizes
// 32 / 64 / 128). Values and gradients checked against masked_attention for [B, K, G, T, S, H] =
// [3, 2, 2, 40, 40, 32] and [2, 2, 1, 37, 37, 64]; standalone, one thread, the demo's packed
// layer: forward 11.9 vs 11.0 ms, backward 19-27 vs 29-31 ms in the quieter rounds (experiments/NOTES_vs_trl.md, "A C++ attention kernel for CPU").
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

// Tiles of keys [0, S) holding at least one visible key for this query row.
int64_t VisibleTiles(const bool* vis, int64_t S, int64_t* tiles) {
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < S; j0 += kTile) {
    int64_t w = std::min(kTile, S - j0);
    bool any = false;
    for (int64_t j = 0; j < w; ++j) any |= vis[j0 + j];
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

// Blocks of kQ consecutive queries (all G heads of one kv head, R = G kQ rows): the key tiles
// any row of the block sees are visited once for the block; each key and value row is loaded
// once per block and its gradient rows written once per block.
constexpr int64_t kQ = 8;
constexpr int64_t kMaxRows = 64;  // G kQ; larger groups take the per-row path

// Tiles any of the block's queries [t0, t0 + nq) sees.
int64_t BlockTiles(const bool* visible, int64_t T, int64_t S, int64_t b, int64_t t0, int64_t nq,
                   int64_t* tiles) {
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < S; j0 += kTile) {
    const int64_t w = std::min(kTile, S - j0);
    bool any = false;
    for (int64_t t = t0; t < t0 + nq && !any; ++t) {
      const bool* vis = visible + (b * T + t) * S + j0;
      for (int64_t j = 0; j < w; ++j) any |= vis[j];
    }
    if (any) tiles[n++] = j0;
  }
  return n;
}

// Scaled, masked scores of rows r = g kQ + tq (query t0 + tq, head g) for the given tiles:
// sc[(r * ntiles + ti) * kTile + j]. xt: keys transposed [H, S].
template <int64_t H>
void BlockScores(const Dims& d, const float* q, const float* xt, const bool* visible,
                 int64_t bk, int64_t t0, int64_t nq, const int64_t* tiles, int64_t ntiles,
                 float scale, float* sc) {
  const int64_t b = bk / d.K, R = d.G * kQ;
  for (int64_t ti = 0; ti < ntiles; ++ti) {
    const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
    Vec acc[kMaxRows];
    for (int64_t r = 0; r < R; ++r) acc[r] = Vec{0};
    if (w == kTile) {
      for (int64_t h = 0; h < H; ++h) {
        const Vec kv = LoadVec(xt + h * d.S + j0);
        for (int64_t g = 0; g < d.G; ++g)
          for (int64_t tq = 0; tq < nq; ++tq)
            acc[g * kQ + tq] += q[(((bk * d.G) + g) * d.T + t0 + tq) * H + h] * kv;
      }
    } else {
      for (int64_t g = 0; g < d.G; ++g)
        for (int64_t tq = 0; tq < nq; ++tq) {
          const float* qv = q + (((bk * d.G) + g) * d.T + t0 + tq) * H;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t j = 0; j < w; ++j) acc[g * kQ + tq][j] += qv[h] * xt[h * d.S + j0 + j];
        }
    }
    for (int64_t g = 0; g < d.G; ++g)
      for (int64_t tq = 0; tq < kQ; ++tq) {
        const int64_t r = g * kQ + tq;
        float* st = sc + (r * ntiles + ti) * kTile;
        const bool* vis = visible + (b * d.T + t0 + tq) * d.S + j0;
        for (int64_t j = 0; j < kTile; ++j)
          st[j] = (tq < nq && j < w && vis[j]) ? acc[r][j] * scale : kMasked;
      }
  }
}

template <int64_t H>
void ForwardBlocked(const Dims& d, const float* q, const float* k, const float* v,
                    const bool* visible, float* out, float* lse, int64_t bk) {
  const int64_t b = bk / d.K, R = d.G * kQ;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float* kb = k + bk * d.S * H;
  const float* vb = v + bk * d.S * H;
  const int64_t max_tiles = (d.S + kTile - 1) / kTile;
  std::vector<float> kt(H * d.S), sc(R * max_tiles * kTile), o(R * H);
  std::vector<int64_t> tiles(max_tiles);
  Transpose(kb, d.S, H, kt.data());
  float mean[H] = {0};
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t h = 0; h < H; ++h) mean[h] += vb[s * H + h];
  for (int64_t h = 0; h < H; ++h) mean[h] /= static_cast<float>(d.S);
  float m[kMaxRows], l[kMaxRows];
  for (int64_t t0 = 0; t0 < d.T; t0 += kQ) {
    const int64_t nq = std::min(kQ, d.T - t0);
    const int64_t ntiles = BlockTiles(visible, d.T, d.S, b, t0, nq, tiles.data());
    BlockScores<H>(d, q, kt.data(), visible, bk, t0, nq, tiles.data(), ntiles, scale, sc.data());
    for (int64_t r = 0; r < R; ++r) {
      float* st = sc.data() + r * ntiles * kTile;
      float mx = kMasked;
      for (int64_t i = 0; i < ntiles * kTile; ++i) mx = std::max(mx, st[i]);
      float sum = 0.0f;
      for (int64_t i = 0; i < ntiles * kTile; ++i) {
        st[i] = Exp(st[i] - mx);
        sum += st[i];
      }
      m[r] = mx;
      l[r] = sum;
    }
    std::fill(o.begin(), o.end(), 0.0f);
    for (int64_t ti = 0; ti < ntiles; ++ti) {
      const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
      for (int64_t j = 0; j < w; ++j) {
        const float* vr = vb + (j0 + j) * H;
        for (int64_t r = 0; r < R; ++r) {
          const float p = sc[(r * ntiles + ti) * kTile + j];
          float* orow = o.data() + r * H;
#pragma GCC ivdep
          for (int64_t h = 0; h < H; ++h) orow[h] += p * vr[h];
        }
      }
    }
    for (int64_t g = 0; g < d.G; ++g)
      for (int64_t tq = 0; tq < nq; ++tq) {
        const int64_t r = g * kQ + tq, row = ((bk * d.G) + g) * d.T + t0 + tq;
        float* orow = out + row * H;
        if (m[r] <= kMasked) {  // sees nothing: the mean of all values
          std::copy(mean, mean + H, orow);
          lse[row] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float inv = 1.0f / l[r];
        for (int64_t h = 0; h < H; ++h) orow[h] = o[r * H + h] * inv;
        lse[row] = m[r] + std::log(l[r]);
      }
  }
}

template <int64_t H>
void BackwardBlocked(const Dims& d, const float* q, const float* k, const float* v,
                     const bool* visible, const float* out, const float* lse, const float* dout,
                     float* dq, float* dk, float* dv, int64_t bk) {
  const int64_t b = bk / d.K, R = d.G * kQ;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float* kb = k + bk * d.S * H;
  const float* vb = v + bk * d.S * H;
  float* dkb = dk + bk * d.S * H;
  float* dvb = dv + bk * d.S * H;
  std::fill(dkb, dkb + d.S * H, 0.0f);
  std::fill(dvb, dvb + d.S * H, 0.0f);
  const int64_t max_tiles = (d.S + kTile - 1) / kTile;
  std::vector<float> kt(H * d.S), vt(H * d.S), sc(R * max_tiles * kTile),
      dp(R * max_tiles * kTile), gq(R * H);
  std::vector<int64_t> tiles(max_tiles);
  Transpose(kb, d.S, H, kt.data());
  Transpose(vb, d.S, H, vt.data());
  float D[kMaxRows], ls[kMaxRows];
  float blind[H] = {0};  // dout summed over the queries that see nothing
  for (int64_t t0 = 0; t0 < d.T; t0 += kQ) {
    const int64_t nq = std::min(kQ, d.T - t0);
    const int64_t ntiles = BlockTiles(visible, d.T, d.S, b, t0, nq, tiles.data());
    BlockScores<H>(d, q, kt.data(), visible, bk, t0, nq, tiles.data(), ntiles, scale, sc.data());
    // dP = dout . v: the same dots with dout as queries and values as keys (unscaled, unmasked)
    BlockScores<H>(d, dout, vt.data(), visible, bk, t0, nq, tiles.data(), ntiles, 1.0f,
                   dp.data());
    for (int64_t g = 0; g < d.G; ++g)
      for (int64_t tq = 0; tq < kQ; ++tq) {
        const int64_t r = g * kQ + tq;
        D[r] = 0.0f;
        ls[r] = std::numeric_limits<float>::infinity();  // rows past T: P = 0
        if (tq >= nq) continue;
        const int64_t row = ((bk * d.G) + g) * d.T + t0 + tq;
        const float* go = dout + row * H;
        const float* ov = out + row * H;
        for (int64_t h = 0; h < H; ++h) D[r] += go[h] * ov[h];
        ls[r] = lse[row];
        if (std::isinf(ls[r])) {  // sees nothing: uniform over all S keys, only dv
          for (int64_t h = 0; h < H; ++h) blind[h] += go[h];
          ls[r] = std::numeric_limits<float>::infinity();
        }
      }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < ntiles * kTile; ++i) {
        const float p = Exp(sc[r * ntiles * kTile + i] - ls[r]);
        float& x = dp[r * ntiles * kTile + i];
        x = p * (x - D[r]) * scale;  // dS
        sc[r * ntiles * kTile + i] = p;
      }
    std::fill(gq.begin(), gq.end(), 0.0f);
    for (int64_t ti = 0; ti < ntiles; ++ti) {
      const int64_t j0 = tiles[ti], w = std::min(kTile, d.S - j0);
      for (int64_t j = 0; j < w; ++j) {
        const float* kr = kb + (j0 + j) * H;
        float gk[H] = {0}, gv[H] = {0};
        for (int64_t g = 0; g < d.G; ++g)
          for (int64_t tq = 0; tq < nq; ++tq) {
            const int64_t r = g * kQ + tq, row = ((bk * d.G) + g) * d.T + t0 + tq;
            const int64_t i = (r * ntiles + ti) * kTile + j;
            const float p = sc[i], ds = dp[i];
            const float* qv = q + row * H;
            const float* go = dout + row * H;
            float* gqr = gq.data() + r * H;
#pragma GCC ivdep
            for (int64_t h = 0; h < H; ++h) {
              gqr[h] += ds * kr[h];
              gk[h] += ds * qv[h];
              gv[h] += p * go[h];
            }
          }
        float* gkb = dkb + (j0 + j) * H;
        float* gvb = dvb + (j0 + j) * H;
        for (int64_t h = 0; h < H; ++h) {
          gkb[h] += gk[h];
          gvb[h] += gv[h];
        }
      }
    }
    for (int64_t g = 0; g < d.G; ++g)
      for (int64_t tq = 0; tq < nq; ++tq) {
        const int64_t r = g * kQ + tq, row = ((bk * d.G) + g) * d.T + t0 + tq;
        std::copy(gq.data() + r * H, gq.data() + (r + 1) * H, dq + row * H);
      }
  }
  const float inv = 1.0f / static_cast<float>(d.S);
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t h = 0; h < H; ++h) dvb[s * H + h] += blind[h] * inv;
}

void ForwardAny(const Dims& d, const float* q, const float* k, const float* v, const bool* vis,
                float* out, float* lse, int64_t bk) {
  if (d.G * kQ <= kMaxRows) {
    switch (d.H) {
      case 32: return ForwardBlocked<32>(d, q, k, v, vis, out, lse, bk);
      case 64: return ForwardBlocked<64>(d, q, k, v, vis, out, lse, bk);
      case 128: return ForwardBlocked<128>(d, q, k, v, vis, out, lse, bk);
      default: break;
    }
  }
  Forward(d, q, k, v, vis, out, lse, bk);
}

void BackwardAny(const Dims& d, const float* q, const float* k, const float* v, const bool* vis,
                 const float* out, const float* lse, const float* dout, float* dq, float* dk,
                 float* dv, int64_t bk) {
  if (d.G * kQ <= kMaxRows) {
    switch (d.H) {
      case 32: return BackwardBlocked<32>(d, q, k, v, vis, out, lse, dout, dq, dk, dv, bk);
      case 64: return BackwardBlocked<64>(d, q, k, v, vis, out, lse, dout, dq, dk, dv, bk);
      case 128: return BackwardBlocked<128>(d, q, k, v, vis, out, lse, dout, dq, dk, dv, bk);
      default: break;
    }
  }
  Backward(d, q, k, v, vis, out, lse, dout, dq, dk, dv, bk);
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
              [&](int64_t bk) { ForwardAny(d, qp, kp, vp, vis, op, lp, bk); });
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
    BackwardAny(d, qp, kp, vp, vis, op, lp, gp, dqp, dkp, dvp, bk);
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
