// A variant under study, not built by the library: blocks of 8 queries sharing their visited key
// tiles (ForwardBlocked / BackwardBlocked, head sizes 32 / 64 / 128; ForwardAny / BackwardAny
// fall back to the library's per-row Forward / Backward otherwise). It includes the library's
// kernel (arca_jax/qwen3/csrc/packed_attention.cc) and adds these functions to its namespace, so a
// harness compiled from this file calls both; wiring it in means calling ForwardAny / BackwardAny
// from the library's FwdImpl / BwdImpl. Values and gradients checked against masked_attention for
// [B, K, G, T, S, H] = [3, 2, 2, 40, 40, 32] and [2, 2, 1, 37, 37, 64]; standalone, one thread,
// the demo's packed layer: forward 11.9 vs 11.0 ms, backward 19-27 vs 29-31 ms in the quieter
// rounds (experiments/NOTES_vs_trl.md, "A C++ attention kernel for CPU").
#include "../../arca_jax/qwen3/csrc/packed_attention.cc"

namespace {

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

}  // namespace
