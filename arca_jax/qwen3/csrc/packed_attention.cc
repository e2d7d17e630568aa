// Masked softmax attention on the CPU, skipping keys a query cannot see (XLA FFI handlers).
//
// q [B, K, G, T, H], k and v [B, K, S, H] float32, visible [B, T, S] bool (the mask is shared
// by the K x G heads). Forward: out [B, K, G, T, H] and lse [B, K, G, T] (log-sum-exp of the
// scaled visible scores; -inf for a query that sees nothing, whose output is the mean of all S
// values, as a softmax of equal scores gives). Backward: dq, dk, dv from q, k, v, visible, out,
// lse and dout. Keys are visited in tiles of 16 (one 16-float vector of scores); a tile with no
// visible key is skipped, so the work follows the visible pairs, not T x S. Head sizes up to
// 256.
//
// One task per (b, kv head) on XLA's CPU thread pool. The forward takes the G query heads of a
// position together (they share the mask row and each key and value row loaded), their outputs
// held in registers over the tiles. The backward runs over key tiles: for each tile, the rows
// that see it, in chunks whose key and value gradients are summed before they touch memory
// (dk, dv of a tile written once); dq accumulates per (row, tile).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using arca_jax::ParallelFor;

namespace {

using arca_jax::Exp;
using arca_jax::IVec;
using arca_jax::kLanes;
using arca_jax::kParts;
using arca_jax::kTile;
using arca_jax::Load;
using arca_jax::LoadN;
using arca_jax::MaxOf;
using arca_jax::NVec;
using arca_jax::Splat;
using arca_jax::Store;
using arca_jax::StoreN;
using arca_jax::SumOf;
using arca_jax::Vec;

typedef int8_t BVec __attribute__((vector_size(kTile)));  // a tile's 16 visibility flags

constexpr float kMasked = -1e30f;  // a masked score: its exponential underflows to exactly 0

struct Dims {
  int64_t B, K, G, T, S, H;
};

// A float buffer aligned to 64 bytes, zero-filled.
struct Buffer {
  explicit Buffer(int64_t n)
      : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64))) {
    std::memset(p, 0, ((n * 4 + 63) / 64) * 64 + 64);
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* p;
};

// The visible tiles of one query row: their first key and their 16 flags (0 past S).
struct Tiles {
  explicit Tiles(int64_t S) : start((S + kTile - 1) / kTile), flags((S + kTile - 1) / kTile) {}
  int64_t Find(const bool* vis, int64_t S) {  // a whole tile's flags as two 64-bit words
    static_assert(kTile == 16 && sizeof(bool) == 1, "a tile's flags are two 64-bit words");
    int64_t n = 0, j0 = 0;
    for (; j0 + kTile <= S; j0 += kTile) {
      uint64_t w[2];
      std::memcpy(w, vis + j0, 16);
      if (w[0] | w[1]) {
        start[n] = static_cast<int32_t>(j0);
        std::memcpy(&flags[n++], w, 16);
      }
    }
    if (j0 < S) {
      int8_t f[kTile] = {0};
      std::memcpy(f, vis + j0, S - j0);
      uint64_t w[2];
      std::memcpy(w, f, 16);
      if (w[0] | w[1]) {
        start[n] = static_cast<int32_t>(j0);
        std::memcpy(&flags[n++], f, 16);
      }
    }
    return n;
  }
  std::vector<int32_t> start;
  std::vector<BVec> flags;
};

inline IVec Visible(BVec flags) { return __builtin_convertvector(flags, IVec) != IVec{}; }

// Per (b, kv head): k, v transposed [H, Sp] and v's rows padded [Sp, 16 HV] (zeros past S
// and H), Sp = S rounded up to whole tiles.
struct Panels {
  Panels(const float* x, int64_t S, int64_t H, int64_t hp, bool rows, bool transposed)
      : Sp((S + kTile - 1) / kTile * kTile), t(transposed ? H * Sp : 0), r(rows ? Sp * hp : 0) {
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h) {
        if (transposed) t.p[h * Sp + s] = x[s * H + h];
        if (rows) r.p[s * hp + h] = x[s * H + h];
      }
  }
  int64_t Sp;
  Buffer t, r;
};

// Scores of one tile for R query rows: s[r] = scale * q_r . x_j, kMasked where not visible;
// x transposed [H, Sp] from the tile's first key. U partial sums per row (4 with AVX-512's 32
// registers; with AVX2's 16, as many as keep every accumulator in one).
template <int R>
inline void TileScores(const float* const* qr, const float* xt, int64_t Sp, int64_t H,
                       float scale, IVec on, Vec* s) {
  constexpr int U = kParts == 1 ? 4 : R >= 4 ? 1 : 2;
  NVec a[R][U][kParts] = {};
  int64_t h = 0;
  for (; h + U <= H; h += U)
    for (int u = 0; u < U; ++u) {
      NVec x[kParts];
      for (int j = 0; j < kParts; ++j) x[j] = LoadN(xt + (h + u) * Sp + j * kLanes);
      for (int r = 0; r < R; ++r) {
        const float qv = qr[r][h + u];
        for (int j = 0; j < kParts; ++j) a[r][u][j] += qv * x[j];
      }
    }
  for (; h < H; ++h)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kParts; ++j) a[r][0][j] += qr[r][h] * LoadN(xt + h * Sp + j * kLanes);
  for (int r = 0; r < R; ++r) {
    alignas(64) float sum[kTile];
    for (int j = 0; j < kParts; ++j) {
      NVec t = a[r][0][j];
      if constexpr (U == 4) t = (a[r][0][j] + a[r][1][j]) + (a[r][2][j] + a[r][3][j]);
      if constexpr (U == 2) t = a[r][0][j] + a[r][1][j];
      StoreN(sum + j * kLanes, t);
    }
    const Vec v = Load(sum) * scale;
    s[r] = on ? v : Splat(kMasked);
  }
}

// The forward of R heads' rows at one position, over its ntiles visible tiles.
template <int HV, int R>
void ForwardRows(const Dims& d, const float* const* qr, float* const* orow, float* const* lrow,
                 const Tiles& tiles, int64_t ntiles, const Panels& kp, const Panels& vp,
                 float scale, float* sc) {
  constexpr int64_t HP = kTile * HV;
  constexpr int C = HV * kParts;  // native vectors per output row
  Vec mx[R];
  for (int r = 0; r < R; ++r) mx[r] = Splat(kMasked);
  for (int64_t ti = 0; ti < ntiles; ++ti) {
    Vec s[R];
    TileScores<R>(qr, kp.t.p + tiles.start[ti], kp.Sp, d.H, scale, Visible(tiles.flags[ti]), s);
    for (int r = 0; r < R; ++r) {
      Store(sc + (r * ntiles + ti) * kTile, s[r]);
      mx[r] = mx[r] > s[r] ? mx[r] : s[r];
    }
  }
  float m[R];
  for (int r = 0; r < R; ++r) m[r] = MaxOf(mx[r]);
  NVec o[R][C] = {};
  Vec l[R] = {};
  for (int64_t ti = 0; ti < ntiles; ++ti) {
    alignas(64) float p[R][kTile];
    for (int r = 0; r < R; ++r) {
      const Vec e = Exp(Load(sc + (r * ntiles + ti) * kTile) - m[r]);
      Store(p[r], e);
      l[r] += e;
    }
    const float* vt = vp.r.p + tiles.start[ti] * HP;
    for (int j = 0; j < kTile; ++j)
      for (int c = 0; c < C; ++c) {
        const NVec x = LoadN(vt + j * HP + c * kLanes);
        for (int r = 0; r < R; ++r) o[r][c] += p[r][j] * x;
      }
  }
  for (int r = 0; r < R; ++r) {
    const float ls = SumOf(l[r]);
    const float inv = 1.0f / ls;
    alignas(64) float res[HP];
    for (int c = 0; c < C; ++c) StoreN(res + c * kLanes, o[r][c] * inv);
    std::memcpy(orow[r], res, d.H * sizeof(float));
    *lrow[r] = m[r] + std::log(ls);
  }
}

template <int HV>
void Forward(const Dims& d, const float* q, const float* k, const float* v, const bool* visible,
             float* out, float* lse, int64_t bk) {
  constexpr int64_t HP = kTile * HV;
  const int64_t b = bk / d.K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const float* vb = v + bk * d.S * d.H;
  const Panels kp(k + bk * d.S * d.H, d.S, d.H, HP, false, true);
  const Panels vp(vb, d.S, d.H, HP, true, false);
  Tiles tiles(d.S);
  Buffer sc(4 * tiles.start.size() * kTile);
  std::vector<float> mean;
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t ntiles = tiles.Find(visible + (b * d.T + t) * d.S, d.S);
    for (int64_t g0 = 0; g0 < d.G;) {
      // rows whose R x HV output vectors stay in registers (AVX2: half of AVX-512's)
      const int64_t R = d.G - g0 >= 4 && HV * kParts <= 2 ? 4
                        : d.G - g0 >= 2 && HV * kParts <= (kParts == 1 ? 8 : 4) ? 2 : 1;
      const float* qr[4];
      float* orow[4];
      float* lrow[4];
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = ((bk * d.G) + g0 + r) * d.T + t;
        qr[r] = q + row * d.H;
        orow[r] = out + row * d.H;
        lrow[r] = lse + row;
      }
      if (ntiles == 0) {  // sees nothing: the mean of all values
        if (mean.empty()) {
          mean.assign(d.H, 0.0f);
          for (int64_t s = 0; s < d.S; ++s)
            for (int64_t h = 0; h < d.H; ++h) mean[h] += vb[s * d.H + h];
          for (int64_t h = 0; h < d.H; ++h) mean[h] /= static_cast<float>(d.S);
        }
        for (int64_t r = 0; r < R; ++r) {
          std::copy(mean.begin(), mean.end(), orow[r]);
          *lrow[r] = -std::numeric_limits<float>::infinity();
        }
      } else if (R == 4) {
        ForwardRows<HV, 4>(d, qr, orow, lrow, tiles, ntiles, kp, vp, scale, sc.p);
      } else if (R == 2) {
        ForwardRows<HV, 2>(d, qr, orow, lrow, tiles, ntiles, kp, vp, scale, sc.p);
      } else {
        ForwardRows<HV, 1>(d, qr, orow, lrow, tiles, ntiles, kp, vp, scale, sc.p);
      }
      g0 += R;
    }
  }
}

// Rows seeing one key tile, per chunk of the backward: kChunk rows' probabilities and score
// gradients, summed into the tile's key and value gradients [H, 16] once per chunk.
constexpr int kChunk = 8;

template <int HV>
void Backward(const Dims& d, const float* q, const float* k, const float* v, const bool* visible,
              const float* out, const float* lse, const float* dout, float* dq, float* dk,
              float* dv, int64_t bk) {
  constexpr int64_t HP = kTile * HV;
  const int64_t b = bk / d.K, H = d.H, GT = d.G * d.T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const Panels kp(k + bk * d.S * H, d.S, H, HP, true, true);
  const Panels vp(v + bk * d.S * H, d.S, H, HP, false, true);
  const int64_t Sp = kp.Sp, ntile = Sp / kTile;
  const float* qb = q + bk * GT * H;
  const float* ob = out + bk * GT * H;
  const float* gb = dout + bk * GT * H;
  const float* lb = lse + bk * GT;
  float* dqb = dq + bk * GT * H;
  float* dkb = dk + bk * d.S * H;
  float* dvb = dv + bk * d.S * H;
  std::fill(dqb, dqb + GT * H, 0.0f);
  std::fill(dkb, dkb + d.S * H, 0.0f);
  std::fill(dvb, dvb + d.S * H, 0.0f);

  // Which positions see each tile (with their flags): the rows' tile lists, bucketed by tile.
  Tiles tiles(d.S);
  std::vector<int32_t> count(ntile + 1, 0), pos;
  std::vector<BVec> flag;
  std::vector<int32_t> row_tiles;  // the tiles each position sees, position after position,
  std::vector<BVec> row_flags;     // with their flags; position t's from row_start[t]
  std::vector<int32_t> row_start(d.T + 1, 0);
  std::vector<float> delta(GT);  // dout . out per row
  std::vector<float> blind(H, 0.0f);  // the summed dout of rows that see nothing
  bool any_blind = false;
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t n = tiles.Find(visible + (b * d.T + t) * d.S, d.S);
    row_start[t + 1] = row_start[t] + static_cast<int32_t>(n);
    for (int64_t i = 0; i < n; ++i) {
      row_tiles.push_back(tiles.start[i] / kTile);
      row_flags.push_back(tiles.flags[i]);
      ++count[tiles.start[i] / kTile + 1];
    }
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t row = g * d.T + t;
      if (n == 0) {  // uniform over all S keys: only dv, dout / S each
        for (int64_t h = 0; h < H; ++h) blind[h] += gb[row * H + h];
        any_blind = true;
        continue;
      }
      float D = 0.0f;
      for (int64_t h = 0; h < H; ++h) D += gb[row * H + h] * ob[row * H + h];
      delta[row] = D;
    }
  }
  if (any_blind) {
    const float inv = 1.0f / static_cast<float>(d.S);
    for (int64_t s = 0; s < d.S; ++s)
      for (int64_t h = 0; h < H; ++h) dvb[s * H + h] = blind[h] * inv;
  }
  for (int64_t i = 0; i < ntile; ++i) count[i + 1] += count[i];
  pos.resize(count[ntile]);
  flag.resize(count[ntile]);
  {
    std::vector<int32_t> fill(count.begin(), count.end() - 1);
    for (int64_t t = 0; t < d.T; ++t)
      for (int32_t i = row_start[t]; i < row_start[t + 1]; ++i) {
        const int32_t at = fill[row_tiles[i]]++;
        pos[at] = static_cast<int32_t>(t);
        flag[at] = row_flags[i];
      }
  }

  Buffer gk(H * kTile), gv(H * kTile);
  alignas(64) float dqr[HP];
  for (int64_t ti = 0; ti < ntile; ++ti) {
    if (count[ti] == count[ti + 1]) continue;
    const int64_t j0 = ti * kTile;
    std::memset(gk.p, 0, H * kTile * sizeof(float));
    std::memset(gv.p, 0, H * kTile * sizeof(float));
    const float* kt = kp.t.p + j0;
    const float* vt = vp.t.p + j0;
    const float* krows = kp.r.p + j0 * HP;
    int n = 0;
    const float* qr[kChunk];
    const float* gr[kChunk];
    alignas(64) float P[kChunk][kTile];
    alignas(64) float DS[kChunk][kTile];
    auto flush = [&]() {
      for (int64_t h = 0; h < H; ++h) {
        NVec av[kParts], ak[kParts];
        for (int j = 0; j < kParts; ++j) {
          av[j] = LoadN(gv.p + h * kTile + j * kLanes);
          ak[j] = LoadN(gk.p + h * kTile + j * kLanes);
        }
        for (int c = 0; c < n; ++c) {
          const float gh = gr[c][h], qh = qr[c][h];
          for (int j = 0; j < kParts; ++j) {
            av[j] += gh * LoadN(P[c] + j * kLanes);
            ak[j] += qh * LoadN(DS[c] + j * kLanes);
          }
        }
        for (int j = 0; j < kParts; ++j) {
          StoreN(gv.p + h * kTile + j * kLanes, av[j]);
          StoreN(gk.p + h * kTile + j * kLanes, ak[j]);
        }
      }
      n = 0;
    };
    for (int32_t e = count[ti]; e < count[ti + 1]; ++e) {
      const IVec on = Visible(flag[e]);
      for (int64_t g = 0; g < d.G; ++g) {
        const int64_t row = g * d.T + pos[e];
        const float* qv = qb + row * H;
        const float* go = gb + row * H;
        Vec s, dp;
        TileScores<1>(&qv, kt, Sp, H, scale, on, &s);
        TileScores<1>(&go, vt, Sp, H, 1.0f, IVec{} == IVec{}, &dp);
        const Vec p = Exp(s - lb[row]);
        const Vec ds = p * (dp - delta[row]) * scale;
        Store(P[n], p);
        Store(DS[n], ds);
        constexpr int C = HV * kParts;  // native vectors per row
        NVec acc[C];
        std::memset(dqr, 0, sizeof(dqr));
        std::memcpy(dqr, dqb + row * H, H * sizeof(float));
        for (int c = 0; c < C; ++c) acc[c] = LoadN(dqr + c * kLanes);
        for (int j = 0; j < kTile; ++j) {
          const float dj = DS[n][j];
          for (int c = 0; c < C; ++c) acc[c] += dj * LoadN(krows + j * HP + c * kLanes);
        }
        for (int c = 0; c < C; ++c) StoreN(dqr + c * kLanes, acc[c]);
        std::memcpy(dqb + row * H, dqr, H * sizeof(float));
        qr[n] = qv;
        gr[n++] = go;
        if (n == kChunk) flush();
      }
    }
    if (n) flush();
    const int64_t w = std::min(kTile, d.S - j0);
    for (int64_t j = 0; j < w; ++j)
      for (int64_t h = 0; h < H; ++h) {
        dkb[(j0 + j) * H + h] += gk.p[h * kTile + j];
        dvb[(j0 + j) * H + h] += gv.p[h * kTile + j];
      }
  }
}

// The template instance for H: 16-float vectors per row, rounded up to 1, 2, 4, 8 or 16.
template <template <int> class F, typename... A>
bool ByHeadSize(int64_t H, A&&... a) {
  if (H <= 16) return F<1>::Run(a...), true;
  if (H <= 32) return F<2>::Run(a...), true;
  if (H <= 64) return F<4>::Run(a...), true;
  if (H <= 128) return F<8>::Run(a...), true;
  if (H <= 256) return F<16>::Run(a...), true;
  return false;
}
template <int HV>
struct FwdOf {
  template <typename... A>
  static void Run(A&&... a) { Forward<HV>(a...); }
};
template <int HV>
struct BwdOf {
  template <typename... A>
  static void Run(A&&... a) { Backward<HV>(a...); }
};

Dims DimsOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  return Dims{qd[0], qd[1], qd[2], qd[3], kd[2], qd[4]};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  if (q.dimensions().size() != 5 || k.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("packed attention: q [B,K,G,T,H], k [B,K,S,H]");
  if (q.dimensions()[4] > 256)
    return ffi::Error::InvalidArgument("packed attention: head size above 256");
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> visible,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (ffi::Error e = CheckShapes(q, k); e.failure()) return e;
  const Dims d = DimsOf(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* vis = visible.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, d.B * d.K, [&](int64_t bk) {
    ByHeadSize<FwdOf>(d.H, d, qp, kp, vp, vis, op, lp, bk);
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> visible,
                   ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (ffi::Error e = CheckShapes(q, k); e.failure()) return e;
  const Dims d = DimsOf(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* vis = visible.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, d.B * d.K, [&](int64_t bk) {
    ByHeadSize<BwdOf>(d.H, d, qp, kp, vp, vis, op, lp, gp, dqp, dkp, dvp, bk);
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
