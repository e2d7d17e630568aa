// 16-float vectors (GCC vector extensions: AVX-512 registers, or pairs of AVX2 ones) and the
// exponential of the kernels' softmaxes (included by each kernel source).
#ifndef ARCA_JAX_VEC16_H_
#define ARCA_JAX_VEC16_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace arca_jax {

constexpr int64_t kTile = 16;
typedef float Vec __attribute__((vector_size(kTile * sizeof(float))));      // a tile of scores
typedef int32_t IVec __attribute__((vector_size(kTile * sizeof(int32_t))));  // its lane masks
// Unaligned loads and stores through a 4-byte-aligned alias of Vec: one (AVX-512) or two (AVX2)
// vector moves; a memcpy into the 64-byte Vec compiles to moves through the stack on AVX2.
typedef float VecU __attribute__((vector_size(kTile * sizeof(float)), aligned(4), may_alias));
inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec x) { *reinterpret_cast<VecU*>(p) = x; }
inline Vec Splat(float x) { return Vec{} + x; }

// exp(x) per lane for x <= 0 (exact 0 below -87), within ~2 ulp of std::exp: 2^n from the
// exponent bits times a degree-6 polynomial for 2^f, n = round(x log2 e) (|f| <= 0.5).
inline Vec Exp(Vec x) {
  const IVec zero = x < Splat(-87.0f);
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  const Vec t = x * 1.44269504088896341f;
  const Vec n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, ties to even
  const Vec f = t - n;
  Vec p = Splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return zero ? Vec{} : p * scale;
}

inline float MaxOf(Vec x) {
  float m = x[0];
  for (int j = 1; j < kTile; ++j) m = std::max(m, x[j]);
  return m;
}
inline float SumOf(Vec x) {
  float s = 0.0f;
  for (int j = 0; j < kTile; ++j) s += x[j];
  return s;
}

// The host's native vector: 16 floats with AVX-512, 8 with AVX2; kParts of them make a Vec.
// Loops that multiply vectors by run-time scalars use these (GCC broadcasts a scalar into a
// 64-byte Vec through general registers on AVX2).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
constexpr int kParts = kTile / kLanes;
typedef float NVec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float NVecU __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
inline NVec LoadN(const float* p) { return *reinterpret_cast<const NVecU*>(p); }
inline void StoreN(float* p, NVec x) { *reinterpret_cast<NVecU*>(p) = x; }

}  // namespace arca_jax

#endif  // ARCA_JAX_VEC16_H_
