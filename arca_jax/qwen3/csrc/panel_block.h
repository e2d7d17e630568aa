// The panel kernel's inner block (included by panel_matmul.cc and decode_layer.cc): R rows of
// x times one column panel of a packed kernel, the R x 16 outputs in registers over the whole
// sum (see panel_matmul.cc for the layout and why).
#ifndef ARCA_JAX_PANEL_BLOCK_H_
#define ARCA_JAX_PANEL_BLOCK_H_

#include <cstdint>

#include "vec16.h"

namespace arca_jax {

constexpr int64_t kPanel = 16;                  // columns per panel
constexpr int kPanelParts = kPanel / kLanes;    // vectors per panel row
constexpr int kBlockRows = kPanelParts == 1 ? 12 : 6;  // rows per block: 12 or 16 accumulators
constexpr int64_t kAhead = 32;                  // panel rows prefetched ahead

// What a block does with its sums: store them, add them to y, or store them times a per-row
// scale (`scale`, indexed by the block's rows).
enum class Out { kStore, kAdd, kScale };

// R rows of x (row stride K) times panel p [K, 16] -> the first `cols` columns of R rows of y
// (row stride N), as `mode` says.
template <int R, Out mode = Out::kStore>
inline void Block(const float* x, int64_t K, const float* p, float* y, int64_t N, int64_t cols,
                  const float* scale = nullptr) {
  NVec acc[R][kPanelParts];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanelParts; ++j) acc[r][j] = NVec{};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(p + (k + kAhead) * kPanel);
    NVec w[kPanelParts];
    for (int j = 0; j < kPanelParts; ++j) w[j] = LoadN(p + k * kPanel + j * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * K + k];
#pragma GCC unroll 2
      for (int j = 0; j < kPanelParts; ++j) acc[r][j] += xv * w[j];
    }
  }
  if constexpr (mode == Out::kScale) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanelParts; ++j) acc[r][j] *= scale[r];
  }
  if (cols == kPanel) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanelParts; ++j) {
        float* out = y + r * N + j * kLanes;
        if constexpr (mode == Out::kAdd) StoreN(out, LoadN(out) + acc[r][j]);
        else StoreN(out, acc[r][j]);
      }
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float v = acc[r][c / kLanes][c % kLanes];
        if constexpr (mode == Out::kAdd) y[r * N + c] += v;
        else y[r * N + c] = v;
      }
  }
}

// m rows: blocks of R, then the rest with smaller blocks (`scale` follows the rows).
template <int R, Out mode = Out::kStore>
void Rows(const float* x, int64_t K, const float* p, float* y, int64_t N, int64_t cols, int64_t m,
          const float* scale = nullptr) {
  if constexpr (R > 0) {
    for (; m >= R; m -= R, x += R * K, y += R * N) {
      Block<R, mode>(x, K, p, y, N, cols, scale);
      if constexpr (mode == Out::kScale) scale += R;
    }
    if (m > 0) Rows<R - 1, mode>(x, K, p, y, N, cols, m, scale);
  }
}

}  // namespace arca_jax

#endif  // ARCA_JAX_PANEL_BLOCK_H_
