// What it costs one core to read a buffer another core has just written, against re-reading
// its own writes (16-float strides: one load per cache line). Not a test: times only.
//
//   g++ -O2 -pthread experiments/cpu_matmul/xcore.cc -o /tmp/xcore && /tmp/xcore
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
int main() {
  for (size_t kb : {4, 16, 64, 256}) {
    size_t n = kb * 1024 / 4;
    std::vector<float> buf(n, 1.0f);
    std::atomic<int> turn{0};
    double cross = 0, local = 0; int reps = 200;
    std::thread b([&] {
      for (int r = 0; r < reps; ++r) {
        while (turn.load() != 1) {}
        auto t0 = std::chrono::steady_clock::now();
        volatile float s = 0; float acc = 0;
        for (size_t i = 0; i < n; i += 16) acc += buf[i];
        s = acc;
        cross += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        // local: write then read
        for (size_t i = 0; i < n; i += 16) buf[i] = r;
        t0 = std::chrono::steady_clock::now();
        acc = 0; for (size_t i = 0; i < n; i += 16) acc += buf[i];
        s = acc;
        local += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        turn.store(0);
      }
    });
    for (int r = 0; r < reps; ++r) {
      while (turn.load() != 0) {}
      for (size_t i = 0; i < n; ++i) buf[i] = r;
      turn.store(1);
    }
    b.join();
    printf("%zu KB (%zu lines): cross-core read %.2f us (%.0f ns/line), local %.2f us\n", kb, n / 16, cross / reps, cross / reps * 1000 / (n / 16), local / reps);
  }
}
