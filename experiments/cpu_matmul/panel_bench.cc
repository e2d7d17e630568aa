// The library's panel kernel (`arca_jax/qwen3/csrc/panel_matmul.cc`, included) on a decode step's
// 16 rows, outside XLA: one thread, and two threads that stay awake between calls (the caller
// and one helper spinning on a counter, no thread pool), with the weights hot in cache (one copy)
// or streamed from memory (`copies` copies, more than the last-level cache holds, used in turn).
// Not a test: times only. What the same products take inside the decode loop, where each call
// hands half its panels to a helper of XLA's pool, is the difference to look at.
//
//   g++ -O3 -march=native -std=c++17 -pthread -w -I$(python -c "import jax; print(jax.ffi.include_dir())") \
//       experiments/cpu_matmul/panel_bench.cc -o /tmp/panel_bench
//   /tmp/panel_bench [copies 24]     # the CPU benchmark model's five products
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "../../arca_jax/qwen3/csrc/panel_matmul.cc"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// y [16, N] = x [16, K] times panels [c0, c1) of w [N / 16, K, 16]
void Panels(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    Rows<kRows>(x, K, w + c * K * kPanel, y + c * kPanel, N, kPanel, 16);
}

void Bench(const char* name, int64_t K, int64_t N, int copies) {
  const int64_t C = N / kPanel, M = 16;
  std::vector<float*> ws(copies);
  for (auto& p : ws) {
    p = static_cast<float*>(aligned_alloc(64, C * K * kPanel * sizeof(float)));
    for (int64_t i = 0; i < C * K * kPanel; ++i) p[i] = 1e-3f * (i % 7);
  }
  std::vector<float> x(M * K, 0.5f), y(M * N);
  const float* volatile current = nullptr;
  std::atomic<int64_t> gen{0}, finished{0};
  std::atomic<bool> stop{false};
  std::thread helper([&] {
    int64_t seen = 0;
    for (;;) {
      int64_t g;
      while ((g = gen.load(std::memory_order_acquire)) == seen) {
      }
      seen = g;
      if (stop.load()) return;
      Panels(x.data(), K, current, y.data(), N, C / 2, C);
      finished.fetch_add(1, std::memory_order_release);
    }
  });
  for (int threads : {1, 2}) {
    for (int hot : {1, 0}) {
      const int n = 400, use = hot ? 1 : copies;
      double best = 1e9;
      for (int rep = 0; rep < 5; ++rep) {
        const double t0 = Now();
        for (int i = 0; i < n; ++i) {
          current = ws[i % use];
          if (threads == 1) {
            Panels(x.data(), K, current, y.data(), N, 0, C);
          } else {
            const int64_t f = finished.load();
            gen.fetch_add(1, std::memory_order_release);
            Panels(x.data(), K, current, y.data(), N, 0, C / 2);
            while (finished.load(std::memory_order_acquire) == f) {
            }
          }
        }
        best = std::min(best, (Now() - t0) / n);
      }
      std::printf("%-8s [16, %4ld] x [%4ld, %4ld]  %d thread(s), weights %-6s %7.1f us  %6.1f GF/s\n",
                  name, static_cast<long>(K), static_cast<long>(K), static_cast<long>(N), threads,
                  hot ? "hot" : "cold", best * 1e6, 2.0 * M * K * N / best / 1e9);
    }
  }
  stop = true;
  gen.fetch_add(1);
  helper.join();
  for (auto p : ws) free(p);
}

}  // namespace

int main(int argc, char** argv) {
  const int copies = argc > 1 ? std::atoi(argv[1]) : 24;
  Bench("qkv", 256, 512, copies);
  Bench("o", 256, 256, copies);
  Bench("gate_up", 256, 1536, copies);
  Bench("down", 768, 256, copies);
  Bench("head", 256, 8192, std::max(2, copies / 6));
  return 0;
}
