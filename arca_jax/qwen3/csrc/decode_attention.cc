// Attention of one new token per row over the key/value cache on the CPU (an XLA FFI handler):
// the decode step's "cpu-kernel" attention (`cache_attention.attend_cpu`).
//
// q [B, K, G, H] float32 (each row's G query heads per kv head), k [B, K, H, S] (keys stored
// transposed, the cache layout of "reduce"), v [B, K, S, H], bias [B, S] float32 (0, or a large
// negative number for a slot the row does not see), filled [] int32: no row sees a slot at or
// past it (the longest row's count), so those are skipped. out [B, K, G, H] float32:
// softmax(q k / sqrt(H) + bias) v, the values of the XLA variants; a row that sees none of the
// first `filled` slots (never in a decode step, where a row sees its own new token) gets the
// mean of their values.
//
// One (row, kv head) per task: scores for 16 slots at a time (a key tile [H, 16] read from the
// transposed cache, contiguous per h, and reused from L1 by the G heads), the softmax with the
// vector exponential, then the values weighted 16 lanes of H at a time. A small call runs on the
// calling thread alone.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attend_row.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using arca_jax::Attend;

constexpr double kSmall = 2e5;  // flops below which one thread runs the call

ffi::Error DecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::S32> filled, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 2 ||
      kd[0] != qd[0] || kd[1] != qd[1] || kd[2] != qd[3] || vd[0] != qd[0] || vd[1] != qd[1] ||
      vd[2] != kd[3] || vd[3] != qd[3] || bd[0] != qd[0] || bd[1] != kd[3] ||
      filled.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "decode attention: q [B, K, G, H], k [B, K, H, S], v [B, K, S, H], bias [B, S], "
        "filled []");
  }
  const int64_t B = qd[0], K = qd[1], G = qd[2], H = qd[3], S = kd[3];
  const int64_t n = std::clamp<int64_t>(filled.typed_data()[0], 1, S);
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  auto task = [&](int64_t bk) {
    thread_local std::vector<float> scratch;
    Attend(qp + bk * G * H, kp + bk * H * S, vp + bk * S * H, bp + (bk / K) * S,
           op + bk * G * H, G, H, S, n, scratch);
  };
  arca_jax::ForEach(pool, B * K, 4.0 * B * K * G * n * H < kSmall, task);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcaDecodeAttention, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
