// One layer's attention through the library's kernel (arca_jax/qwen3/csrc/packed_attention.cc)
// and the first version (packed_attention_v1.cc), on one thread, the same inputs: the largest
// relative difference of their outputs and the best of N rounds of each (forward; backward).
// Built and run by kernel_ab.py, which writes the inputs (raw float32 / uint8 files).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#undef XLA_FFI_DEFINE_HANDLER_SYMBOL
#define XLA_FFI_DEFINE_HANDLER_SYMBOL(...)  // the handlers are not needed here
namespace v1 {
#include "packed_attention_v1.cc"
}
namespace lib {
#include "../../arca_jax/qwen3/csrc/packed_attention.cc"
}

template <typename T>
std::vector<T> Read(const std::string& path, size_t n) {
  std::vector<T> x(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(x.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return x;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double RelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) && a[i] == b[i]) continue;
    m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
    s = std::max(s, static_cast<double>(std::fabs(a[i])));
  }
  return m / std::max(s, 1e-30);
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: kernel_ab DIR B K G T S H ROUNDS\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t B = std::atoll(argv[2]), K = std::atoll(argv[3]), G = std::atoll(argv[4]),
                T = std::atoll(argv[5]), S = std::atoll(argv[6]), H = std::atoll(argv[7]);
  const int rounds = std::atoi(argv[8]);
  const size_t nq = B * K * G * T * H, nk = B * K * S * H, nl = B * K * G * T;
  auto q = Read<float>(dir + "/q.bin", nq), k = Read<float>(dir + "/k.bin", nk),
       v = Read<float>(dir + "/v.bin", nk), dout = Read<float>(dir + "/dout.bin", nq);
  auto flags = Read<uint8_t>(dir + "/visible.bin", B * T * S);
  const bool* vis = reinterpret_cast<const bool*>(flags.data());
  std::vector<float> o1(nq), l1(nl), o2(nq), l2(nl), dq1(nq), dk1(nk), dv1(nk), dq2(nq), dk2(nk),
      dv2(nk);
  const v1::Dims d1{B, K, G, T, S, H};
  const lib::Dims d2{B, K, G, T, S, H};
  std::function<void()> runs[4] = {
      [&] {
        for (int64_t bk = 0; bk < B * K; ++bk)
          v1::Forward(d1, q.data(), k.data(), v.data(), vis, o1.data(), l1.data(), bk);
      },
      [&] {
        for (int64_t bk = 0; bk < B * K; ++bk)
          lib::ByHeadSize<lib::FwdOf>(H, d2, q.data(), k.data(), v.data(), vis, o2.data(),
                                      l2.data(), bk);
      },
      [&] {
        for (int64_t bk = 0; bk < B * K; ++bk)
          v1::Backward(d1, q.data(), k.data(), v.data(), vis, o1.data(), l1.data(), dout.data(),
                       dq1.data(), dk1.data(), dv1.data(), bk);
      },
      [&] {
        for (int64_t bk = 0; bk < B * K; ++bk)
          lib::ByHeadSize<lib::BwdOf>(H, d2, q.data(), k.data(), v.data(), vis, o1.data(),
                                      l1.data(), dout.data(), dq2.data(), dk2.data(), dv2.data(),
                                      bk);
      }};
  for (auto& r : runs) r();
  std::printf("largest relative difference: out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n",
              RelDiff(o1, o2), RelDiff(l1, l2), RelDiff(dq1, dq2), RelDiff(dk1, dk2),
              RelDiff(dv1, dv2));
  const char* names[4] = {"forward, first version", "forward, library", "backward, first version",
                          "backward, library"};
  std::vector<double> best(4, 1e9);
  for (int r = 0; r < rounds; ++r)
    for (int i = 0; i < 4; ++i) {
      const double t0 = Now();
      runs[i]();
      best[i] = std::min(best[i], Now() - t0);
    }
  for (int i = 0; i < 4; ++i) std::printf("%-24s %7.2f ms\n", names[i], best[i] * 1e3);
  return 0;
}
