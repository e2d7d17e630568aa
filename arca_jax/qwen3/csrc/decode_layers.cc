// A decode step's decoder layers and head (one new token per row) on the CPU as one XLA FFI
// call. The same model as XLA's operations in `qwen3.inference_forward` (T = 1, float32, the
// kernels packed by `cpu_matmul.pack`, no separate low-rank adapter, one tensor shard), with the
// helpers of XLA's thread pool kept for the whole call (team.h) instead of woken for each
// product.
//
//   x [B, D]            the rows' residual stream entering the first layer
//   bias [B, S]         0 where the row sees the slot (its new one included), else a large
//                       negative number
//   cos, sin [B, H]     the rows' rotary tables (rotate-half layout)
//   index [B] int32     the slot each row's new key and value go to
//   filled [] int32     no row sees a slot at or past it
//   final_norm [D]      the final norm's scale
//   head [Cv, D, 16]    the packed [D, V] head
//   then per layer:     qkv [Cq, D, 16] (the packed [D, (N + 2K) H] kernel, the input norm's
//                       scale folded in), qk_norm [N + K, H], o [Co, N H, 16], gate_up
//                       [Cg, D, 16] (gate | up, the MLP norm folded in), down [Cd, F, 16],
//                       k [B, K, H, S] (keys transposed), v [B, K, S, H]
//   attribute eps       the RMS norms' epsilon
//   attribute block     the softmax statistics' block of columns (a multiple of 16)
// -> logits [B, V] float32; each row's max logit M [B]; the sums of exp(logit - M) over each
// block of `block` columns [B, ceil(V / block)]; then per layer k, v: the cache, written in
// place (row b's new key and value at slot index[b]).
//
// Per layer, as phases (each finished before the next starts): 1 / rms of x (caller);
// qkv = (x W) / rms, tasks over column panels; per (row, kv head) the q and k heads' norm and
// rotation, the cache writes and the attention (attend_row.h); x += attn o; 1 / rms (caller);
// h = silu(gate) up, each task a gate panel and its up panel; x += h down. Then the final norm
// (caller) and the head with the softmax statistics, tasks over blocks of columns. The products
// are split by columns so that each weight is read once per step: a decode step streams the
// whole model, and on a host whose cache does not hold it, that is the bound.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attend_row.h"
#include "panel_block.h"
#include "team.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using arca_jax::kPanel;
using arca_jax::kTile;
using arca_jax::Load;
using arca_jax::Out;
using arca_jax::Phase;
using arca_jax::Splat;
using arca_jax::Store;
using arca_jax::Vec;

constexpr int kRows = arca_jax::kBlockRows;
constexpr int64_t kTasksPerWorker = 8;
constexpr int kLayerArgs = 7;  // qkv, qk_norm, o, gate_up, down, k, v

struct Layer {
  const float* qkv;
  const float* qk_norm;
  const float* o;
  const float* gate_up;
  const float* down;
  float* k;  // the cache, in place
  float* v;
};

// 1 / sqrt(mean(x^2) + eps) over n floats (16 lanes of partial sums, then the rest).
inline float InvRms(const float* x, int64_t n, float eps) {
  Vec acc{};
  int64_t i = 0;
  for (; i + kTile <= n; i += kTile) {
    const Vec v = Load(x + i);
    acc += v * v;
  }
  float s = arca_jax::SumOf(acc);
  for (; i < n; ++i) s += x[i] * x[i];
  return 1.0f / std::sqrt(s / static_cast<float>(n) + eps);
}

// Chunks of `per` panels out of C, about kTasksPerWorker per worker.
inline int64_t PanelsPerTask(int64_t C, int64_t workers) {
  const int64_t want = std::max<int64_t>(kTasksPerWorker * workers, 1);
  return std::max<int64_t>((C + want - 1) / want, 1);
}

// x [M, K] times the packed w [ceil(N / 16), K, 16] -> y [M, N] as `mode` says (scale: one per
// row of x), tasks over chunks of panels.
template <Out mode>
Phase Product(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N,
              int64_t workers, const float* scale = nullptr) {
  const int64_t C = (N + kPanel - 1) / kPanel, per = PanelsPerTask(C, workers);
  return Phase{(C + per - 1) / per, false, [=](int64_t t) {
    for (int64_t c = t * per; c < std::min(C, (t + 1) * per); ++c) {
      arca_jax::Rows<kRows, mode>(x, K, w + c * K * kPanel, y + c * kPanel, N,
                                  std::min(kPanel, N - c * kPanel), M, scale);
    }
  }};
}

// Head vector v [H] -> scale * v / rms(v), rotated by cos, sin (rotate-half) -> out [H].
inline void NormRotate(const float* v, const float* scale, const float* cos, const float* sin,
                       int64_t H, float eps, float* out) {
  const float r = InvRms(v, H, eps);
  const int64_t half = H / 2;
  if (half % kTile == 0) {
    for (int64_t h = 0; h < half; h += kTile) {
      const Vec a = Load(scale + h) * (Load(v + h) * r);
      const Vec b = Load(scale + half + h) * (Load(v + half + h) * r);
      Store(out + h, a * Load(cos + h) - b * Load(sin + h));
      Store(out + half + h, b * Load(cos + half + h) + a * Load(sin + half + h));
    }
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const int64_t o = h < half ? h + half : h - half;
    const float a = scale[h] * (v[h] * r);
    const float b = scale[o] * (v[o] * r);
    out[h] = a * cos[h] + (h < half ? -b : b) * sin[h];
  }
}

// h[j] = silu(g[j]) u[j] for n floats (silu(x) = x sigmoid(x), from e = e^-|x|).
inline void SwiGlu(const float* g, const float* u, float* h, int64_t n) {
  int64_t j = 0;
  for (; j + kTile <= n; j += kTile) {
    const Vec x = Load(g + j);
    const Vec e = arca_jax::Exp(x < Splat(0.0f) ? x : -x);
    const Vec r = 1.0f / (1.0f + e);              // sigmoid(|x|)
    const Vec sig = x < Splat(0.0f) ? e * r : r;  // e^x / (1 + e^x) below 0
    Store(h + j, x * sig * Load(u + j));
  }
  for (; j < n; ++j) h[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
}

// Sizes shared by every layer (checked per layer).
struct Dims {
  int64_t B, D, N, K, G, H, S, F, QKV, n;
  float eps;
};

// One layer's phases, appended to `phases`; y [B, D] the residual stream (in place).
void LayerPhases(const Dims& d, const Layer& L, float* y, const float* bias, const float* cos,
                 const float* sin, const int32_t* index, float* work, int64_t workers,
                 std::vector<Phase>& phases) {
  const int64_t B = d.B, D = d.D, N = d.N, K = d.K, G = d.G, H = d.H, S = d.S, F = d.F,
                QKV = d.QKV, n = d.n;
  const float eps = d.eps;
  float* qkv = work;             // [B, (N + 2K) H]
  float* q = qkv + B * QKV;      // [B, K, G, H]: the rotated query heads
  float* attn = q + B * N * H;   // [B, K, G, H]
  float* gu = attn + B * N * H;  // [B, 2F] (when F is not a multiple of 16)
  float* h = gu + B * 2 * F;     // [B, F]
  float* inv = h + B * F;        // [B]
  phases.push_back({B, true, [=](int64_t b) { inv[b] = InvRms(y + b * D, D, eps); }});
  phases.push_back(Product<Out::kScale>(y, B, D, L.qkv, qkv, QKV, workers, inv));
  phases.push_back({B * K, false, [=](int64_t t) {
    const int64_t b = t / K, kh = t % K;
    const float* row = qkv + b * QKV;
    const float *c = cos + b * H, *s = sin + b * H;
    float* qh = q + t * G * H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t head = kh * G + g;
      NormRotate(row + head * H, L.qk_norm + head * H, c, s, H, eps, qh + g * H);
    }
    thread_local std::vector<float> key, scratch;
    key.resize(H);
    NormRotate(row + (N + kh) * H, L.qk_norm + (N + kh) * H, c, s, H, eps, key.data());
    const int64_t slot = std::clamp<int64_t>(index[b], 0, S - 1);
    float* kt = L.k + t * H * S;  // [H, S]
    float* vt = L.v + t * S * H;  // [S, H]
    const float* value = row + (N + K + kh) * H;
    for (int64_t j = 0; j < H; ++j) {
      kt[j * S + slot] = key[j];
      vt[slot * H + j] = value[j];
    }
    arca_jax::Attend(qh, kt, vt, bias + b * S, attn + t * G * H, G, H, S, n, scratch);
  }});
  phases.push_back(Product<Out::kAdd>(attn, B, N * H, L.o, y, D, workers));
  phases.push_back({B, true, [=](int64_t b) { inv[b] = InvRms(y + b * D, D, eps); }});
  if (F % kPanel == 0) {  // a task: gate panels and their up panels, then the SwiGLU of them
    const int64_t C = F / kPanel, per = PanelsPerTask(C, workers);
    phases.push_back({(C + per - 1) / per, false, [=](int64_t t) {
      thread_local std::vector<float> tile;
      tile.resize(2 * B * kPanel);
      float* g = tile.data();
      float* u = g + B * kPanel;
      for (int64_t c = t * per; c < std::min(C, (t + 1) * per); ++c) {
        arca_jax::Rows<kRows, Out::kScale>(y, D, L.gate_up + c * D * kPanel, g, kPanel, kPanel,
                                           B, inv);
        arca_jax::Rows<kRows, Out::kScale>(y, D, L.gate_up + (C + c) * D * kPanel, u, kPanel,
                                           kPanel, B, inv);
        for (int64_t b = 0; b < B; ++b) {
          SwiGlu(g + b * kPanel, u + b * kPanel, h + b * F + c * kPanel, kPanel);
        }
      }
    }});
  } else {
    phases.push_back(Product<Out::kScale>(y, B, D, L.gate_up, gu, 2 * F, workers, inv));
    phases.push_back({B, false, [=](int64_t b) {
      SwiGlu(gu + b * 2 * F, gu + b * 2 * F + F, h + b * F, F);
    }});
  }
  phases.push_back(Product<Out::kAdd>(h, B, F, L.down, y, D, workers));
}

ffi::Error LayersImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                      ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> filled,
                      ffi::Buffer<ffi::F32> final_norm, ffi::Buffer<ffi::F32> head,
                      ffi::RemainingArgs rest, float eps, int64_t block,
                      ffi::ResultBuffer<ffi::F32> logits, ffi::ResultBuffer<ffi::F32> row_max,
                      ffi::ResultBuffer<ffi::F32> block_sums, ffi::RemainingRets caches) {
  const char* kShapes =
      "decode layers: x [B, D], bias [B, S], cos, sin [B, H], index [B], filled [], "
      "final_norm [D], head [ceil(V / 16), D, 16], then per layer qkv [ceil((N + 2K) H / 16), "
      "D, 16], qk_norm [N + K, H], o [ceil(D / 16), N H, 16], gate_up [ceil(2F / 16), D, 16], "
      "down [ceil(D / 16), F, 16], k [B, K, H, S], v [B, K, S, H]; attribute block (a multiple "
      "of 16); results logits [B, V], row max [B], block sums [B, ceil(V / block)] and per "
      "layer k, v";
  const auto xd = x.dimensions(), hd = head.dimensions(), ld = logits->dimensions();
  const int64_t layers_n = static_cast<int64_t>(rest.size()) / kLayerArgs;
  if (xd.size() != 2 || hd.size() != 3 || ld.size() != 2 || ld[0] != xd[0] ||
      hd[0] != (ld[1] + kPanel - 1) / kPanel || hd[1] != xd[1] || hd[2] != kPanel ||
      final_norm.element_count() != xd[1] || layers_n < 1 || block < kPanel ||
      block % kPanel != 0 || row_max->element_count() != xd[0] ||
      block_sums->element_count() != xd[0] * ((ld[1] + block - 1) / block) ||
      static_cast<int64_t>(rest.size()) != kLayerArgs * layers_n ||
      static_cast<int64_t>(caches.size()) != 2 * layers_n) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  Dims d{};
  d.B = xd[0];
  d.D = xd[1];
  d.eps = eps;
  std::vector<Layer> layers;
  auto panels = [](int64_t cols) { return (cols + kPanel - 1) / kPanel; };
  for (int64_t l = 0; l < layers_n; ++l) {
    auto arg = [&](int64_t i) { return rest.get<ffi::Buffer<ffi::F32>>(kLayerArgs * l + i); };
    auto qkv = arg(0), norm = arg(1), o = arg(2), gu = arg(3), down = arg(4), k = arg(5),
         v = arg(6);
    auto k_out = caches.get<ffi::Buffer<ffi::F32>>(2 * l);
    auto v_out = caches.get<ffi::Buffer<ffi::F32>>(2 * l + 1);
    if (!qkv || !norm || !o || !gu || !down || !k || !v || !k_out || !v_out) {
      return ffi::Error::InvalidArgument(kShapes);
    }
    const auto qd = qkv->dimensions(), nd = norm->dimensions(), od = o->dimensions(),
               gd = gu->dimensions(), dd = down->dimensions(), kd = k->dimensions(),
               vd = v->dimensions();
    if (qd.size() != 3 || nd.size() != 2 || od.size() != 3 || gd.size() != 3 ||
        dd.size() != 3 || kd.size() != 4 || vd.size() != 4) {
      return ffi::Error::InvalidArgument(kShapes);
    }
    if (l == 0) {
      d.K = kd[1];
      d.H = kd[2];
      d.S = kd[3];
      d.N = nd[0] - d.K;
      d.F = dd[1];
      d.G = d.K > 0 && d.N > 0 ? d.N / d.K : 0;
      d.QKV = (d.N + 2 * d.K) * d.H;
    }
    const bool ok =
        d.N > 0 && d.K > 0 && d.N % d.K == 0 && d.H % 2 == 0 && nd[1] == d.H &&
        nd[0] == d.N + d.K && kd[0] == d.B && kd[1] == d.K && kd[2] == d.H && kd[3] == d.S &&
        vd[0] == d.B && vd[1] == d.K && vd[2] == d.S && vd[3] == d.H &&
        qd[0] == panels(d.QKV) && qd[1] == d.D && qd[2] == kPanel && od[0] == panels(d.D) &&
        od[1] == d.N * d.H && od[2] == kPanel && gd[0] == panels(2 * d.F) && gd[1] == d.D &&
        gd[2] == kPanel && dd[0] == panels(d.D) && dd[1] == d.F && dd[2] == kPanel &&
        (*k_out)->element_count() == k->element_count() &&
        (*v_out)->element_count() == v->element_count();
    if (!ok) return ffi::Error::InvalidArgument(kShapes);
    layers.push_back(Layer{qkv->typed_data(), norm->typed_data(), o->typed_data(),
                           gu->typed_data(), down->typed_data(), (*k_out)->typed_data(),
                           (*v_out)->typed_data()});
  }
  if (bias.element_count() != d.B * d.S || cos.element_count() != d.B * d.H ||
      sin.element_count() != d.B * d.H || index.element_count() != d.B ||
      filled.element_count() != 1) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  d.n = std::clamp<int64_t>(filled.typed_data()[0], 1, d.S);
  const int64_t V = ld[1];
  thread_local std::vector<float> work;
  work.resize(d.B * (d.QKV + 2 * d.N * d.H + 3 * d.F + 1 + 2 * d.D + (V + block - 1) / block));
  float* y = work.data() + d.B * (d.QKV + 2 * d.N * d.H + 3 * d.F + 1);  // [B, D]
  float* normed = y + d.B * d.D;                                           // [B, D]
  std::copy(x.typed_data(), x.typed_data() + d.B * d.D, y);
  const int64_t workers = arca_jax::Workers(pool);
  std::vector<Phase> phases;
  for (const Layer& L : layers) {
    LayerPhases(d, L, y, bias.typed_data(), cos.typed_data(), sin.typed_data(),
                index.typed_data(), work.data(), workers, phases);
  }
  const float* fn = final_norm.typed_data();
  const int64_t D = d.D;
  phases.push_back({d.B, true, [=](int64_t b) {  // scale * (x / rms(x)), as `rms_norm`
    const float r = InvRms(y + b * D, D, eps);
    for (int64_t j = 0; j < D; ++j) normed[b * D + j] = fn[j] * (y[b * D + j] * r);
  }});
  // the head over blocks of `block` columns: each block's logits, then per row their max m_c
  // and s_c = sum exp(l - m_c) while they are in cache; then per row M = max_c m_c and the
  // block sums s_c exp(m_c - M) (`draw.inverse_cdf`'s, for temperature 1)
  const int64_t C = (V + block - 1) / block, per = PanelsPerTask(C, workers);
  float* lp = logits->typed_data();
  float* mp = row_max->typed_data();
  float* sums = block_sums->typed_data();
  float* bmax = normed + d.B * D;  // [B, C]
  const float* hp = head.typed_data();
  const int64_t B = d.B;
  phases.push_back({(C + per - 1) / per, false, [=](int64_t t) {
    for (int64_t c = t * per; c < std::min(C, (t + 1) * per); ++c) {
      const int64_t v0 = c * block, v1 = std::min(V, v0 + block);
      for (int64_t p = v0 / kPanel; p * kPanel < v1; ++p) {
        arca_jax::Rows<kRows, Out::kStore>(normed, D, hp + p * D * kPanel, lp + p * kPanel, V,
                                           std::min(kPanel, V - p * kPanel), B);
      }
      for (int64_t b = 0; b < B; ++b) {
        const float* l = lp + b * V;
        float m = -INFINITY;
        for (int64_t v = v0; v < v1; ++v) m = std::max(m, l[v]);
        Vec acc{};
        int64_t v = v0;
        for (; v + kTile <= v1; v += kTile) acc += arca_jax::Exp(Load(l + v) - m);
        float total = arca_jax::SumOf(acc);
        for (; v < v1; ++v) total += std::exp(l[v] - m);
        bmax[b * C + c] = m;
        sums[b * C + c] = total;
      }
    }
  }});
  phases.push_back({B, false, [=](int64_t b) {
    float* m = bmax + b * C;
    float* sb = sums + b * C;
    const float top = *std::max_element(m, m + C);
    int64_t c = 0;
    for (; c + kTile <= C; c += kTile) {
      Store(sb + c, Load(sb + c) * arca_jax::Exp(Load(m + c) - top));
    }
    for (; c < C; ++c) sb[c] *= std::exp(m[c] - top);
    mp[b] = top;
  }});
  const double flops = 2.0 * d.B * (layers_n * (d.D * (d.QKV + 3 * d.F) + d.N * d.H * d.D +
                                                2 * d.N * d.H * d.n) + d.D * V);
  arca_jax::RunPhases(pool, phases, flops >= 4e5);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaDecodeLayers, LayersImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // filled
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final_norm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // head
                                  .RemainingArgs()               // per layer: 7 buffers
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logits
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row max
                                  .Ret<ffi::Buffer<ffi::F32>>()  // block sums
                                  .RemainingRets());             // per layer: k, v (aliased)
