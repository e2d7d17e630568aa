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

#include "panel_block.h"
#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using arca_jax::kAhead;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaPanelMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
