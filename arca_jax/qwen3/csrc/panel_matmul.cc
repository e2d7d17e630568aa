// y = x W on the CPU for the few rows of a decode step, with W packed in column panels (an
// XLA FFI handler).
//
// x [M, K] float32; w [C, K, 16] float32, the [K, N] kernel's columns c*16 .. c*16 + 15 as
// panel c (zeros past N); y [M, N] float32. A panel is read row by row, contiguously, and each
// of its K rows multiplies every row of a block of x: the block's 16-column outputs stay in
// registers for the whole sum over K (kRows rows: 6 with 16 AVX2 registers, 12 with 32
// AVX-512 ones), so the kernel's bytes are read once per block of rows and never repacked.
// XLA's own dot packs its right operand on every call; a decode step's operands are the
// model's weights, the same arrays every step, and at a few rows that packing costs about as
// much as the multiply. Panels are split over XLA's CPU thread pool in chunks; a small product
// runs on the calling thread alone.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "panel_block.h"
#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using arca_jax::kLanes;
using arca_jax::kPanel;
using arca_jax::kPanelParts;
using arca_jax::LoadN;
using arca_jax::Rows;
using arca_jax::StoreN;

constexpr int kRows = arca_jax::kBlockRows;
constexpr int64_t kRowChunk = 8 * kRows; // rows of x per task
constexpr double kSmall = 4e5;           // flops below which one thread runs the product
// Tasks per worker: a helper of XLA's pool starts tens of microseconds after the caller, and the
// tasks left then are split between the two; smaller tasks even out the finish (the CPU
// benchmark's decode loop, one process alternating 4 and 16: 2-9% faster in five of seven pairs
// of 12-20 rounds, 1-2% slower in the other two; 2-core Zen 3 EPYC).
constexpr int64_t kTasksPerWorker = 16;

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] ||
      yd[0] != xd[0] || (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument("panel matmul: x [M, K], w [ceil(N / 16), K, 16], y [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], C = wd[0], N = yd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  const int64_t want = 2.0 * M * K * N < kSmall ? 1 : kTasksPerWorker * arca_jax::Workers(pool);
  const int64_t per = (C + std::max<int64_t>(want / row_chunks, 1) - 1) /
                      std::max<int64_t>(want / row_chunks, 1);  // panels per task
  const int64_t panel_chunks = (C + per - 1) / per;
  auto task = [&](int64_t t) {
    const int64_t r0 = (t / panel_chunks) * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
    const int64_t c0 = (t % panel_chunks) * per, c1 = std::min(C, c0 + per);
    for (int64_t c = c0; c < c1; ++c) {
      Rows<kRows>(xp + r0 * K, K, wp + c * K * kPanel, yp + r0 * N + c * kPanel, N,
                  std::min(kPanel, N - c * kPanel), r1 - r0);
    }
  };
  arca_jax::ForEach(pool, row_chunks * panel_chunks, false, task);
  return ffi::Error::Success();
}

// Panels [C, K, 16] (C = ceil(N / 16), zeros past N) from w [K, N] (64-byte row copies), or,
// kTransposed, from the kernel's transpose w [N, K] (e.g. a tied embedding [V, D]; panel c's
// column j is row 16 c + j of w).
template <bool kTransposed>
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions(), od = out->dimensions();
  if (wd.size() != 2 || od.size() != 3 || od[2] != kPanel ||
      od[1] != wd[kTransposed ? 1 : 0] || od[0] != (wd[kTransposed ? 0 : 1] + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument(kTransposed
                                           ? "pack panels: w [N, K] -> [ceil(N / 16), K, 16]"
                                           : "pack panels: w [K, N] -> [ceil(N / 16), K, 16]");
  }
  const int64_t K = wd[kTransposed ? 1 : 0], N = wd[kTransposed ? 0 : 1], C = od[0];
  const float* src = w.typed_data();
  float* dst = out->typed_data();
  auto panel = [&](int64_t c) {
    const int64_t cols = std::min(kPanel, N - c * kPanel);
    float* d = dst + c * K * kPanel;
    if constexpr (kTransposed) {
      if (cols < kPanel) std::fill(d, d + K * kPanel, 0.0f);
      for (int64_t j = 0; j < cols; ++j) {
        const float* row = src + (c * kPanel + j) * K;
        for (int64_t k = 0; k < K; ++k) d[k * kPanel + j] = row[k];
      }
    } else {
      const float* s = src + c * kPanel;
      for (int64_t k = 0; k < K; ++k, d += kPanel, s += N) {
        if (cols == kPanel) {
          for (int j = 0; j < kPanelParts; ++j) StoreN(d + j * kLanes, LoadN(s + j * kLanes));
        } else {
          for (int64_t j = 0; j < kPanel; ++j) d[j] = j < cols ? s[j] : 0.0f;
        }
      }
    }
  };
  arca_jax::ForEach(pool, C, K * N < (1 << 16), panel);
  return ffi::Error::Success();
}

// Panels [C, K, 16] of a layer's fused kernel in one pass: the columns of `parts` side by side
// (part i [L_i, K, N_i], entry layers[i] of its stack), each row k times scale[k] (entry
// `scale_layer` of the last argument [L_s, K]) when scale_layer >= 0. What XLA would do as a
// slice of each stack, a concatenation, a product with the norm's scale and the packing, each a
// pass over the kernel (the CPU demo's weight preparation: ~10 of its 230 ms end to end).
ffi::Error PackPartsImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                         ffi::Span<const int64_t> layers, int64_t scale_layer,
                         ffi::ResultBuffer<ffi::F32> out) {
  const char* kShapes =
      "pack parts: parts [L_i, K, N_i] (a layer index each), then the scale [L_s, K] when "
      "scale_layer >= 0 -> [ceil(sum N_i / 16), K, 16]";
  const int64_t n_parts = static_cast<int64_t>(args.size()) - (scale_layer >= 0 ? 1 : 0);
  if (n_parts < 1 || static_cast<int64_t>(layers.size()) != n_parts) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const auto od = out->dimensions();
  if (od.size() != 3 || od[2] != kPanel) return ffi::Error::InvalidArgument(kShapes);
  const int64_t K = od[1], C = od[0];
  std::vector<const float*> src;  // part i's layer, [K, N_i]
  std::vector<int64_t> first{0};  // part i's first column in the fused kernel
  for (int64_t i = 0; i < n_parts; ++i) {
    auto part = args.get<ffi::Buffer<ffi::F32>>(i);
    if (!part) return ffi::Error::InvalidArgument(kShapes);
    const auto d = part->dimensions();
    if (d.size() != 3 || d[1] != K || layers[i] < 0 || layers[i] >= d[0]) {
      return ffi::Error::InvalidArgument(kShapes);
    }
    src.push_back(part->typed_data() + layers[i] * K * d[2]);
    first.push_back(first.back() + d[2]);
  }
  const int64_t N = first.back();
  const float* scale = nullptr;
  if (scale_layer >= 0) {
    auto s = args.get<ffi::Buffer<ffi::F32>>(n_parts);
    if (!s) return ffi::Error::InvalidArgument(kShapes);
    const auto sd = s->dimensions();
    if (sd.size() != 2 || sd[1] != K || scale_layer >= sd[0]) {
      return ffi::Error::InvalidArgument(kShapes);
    }
    scale = s->typed_data() + scale_layer * K;
  }
  if (C != (N + kPanel - 1) / kPanel) return ffi::Error::InvalidArgument(kShapes);
  float* dst = out->typed_data();
  auto panel = [&](int64_t c) {
    const int64_t c0 = c * kPanel;
    // the part holding the panel's first column, and whether it holds all 16
    int64_t p = 0;
    while (first[p + 1] <= c0) ++p;
    const bool whole = c0 + kPanel <= first[p + 1];
    float* d = dst + c * K * kPanel;
    for (int64_t k = 0; k < K; ++k, d += kPanel) {
      const float s = scale == nullptr ? 1.0f : scale[k];
      if (whole) {
        const float* row = src[p] + k * (first[p + 1] - first[p]) + (c0 - first[p]);
        for (int j = 0; j < kPanelParts; ++j) {
          const arca_jax::NVec v = LoadN(row + j * kLanes);
          StoreN(d + j * kLanes, scale == nullptr ? v : v * s);
        }
        continue;
      }
      int64_t q = p;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t g = c0 + j;
        if (g >= N) {
          d[j] = 0.0f;
          continue;
        }
        while (first[q + 1] <= g) ++q;
        const float v = src[q][k * (first[q + 1] - first[q]) + (g - first[q])];
        d[j] = scale == nullptr ? v : s * v;
      }
    }
  };
  arca_jax::ForEach(pool, C, K * N < (1 << 16), panel);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPackPanelsTransposed, PackImpl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPackPanels, PackImpl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPackPanelsParts, PackPartsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Attr<ffi::Span<const int64_t>>("layers")
                                  .Attr<int64_t>("scale_layer")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPanelMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
