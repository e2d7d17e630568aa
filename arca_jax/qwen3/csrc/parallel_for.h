// The kernels' one helper for XLA's CPU thread pool (included by each kernel source).
#ifndef ARCA_JAX_PARALLEL_FOR_H_
#define ARCA_JAX_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace arca_jax {

// Threads worth running at once: the pool's, at most one per hardware thread (a host with
// several CPU devices per core gives each pool more threads than cores; a helper beyond the
// cores only takes turns with the caller's wait).
inline int64_t Workers(xla::ffi::ThreadPool& pool) {
  const int64_t hw = std::max<int64_t>(std::thread::hardware_concurrency(), 1);
  return std::max<int64_t>(std::min<int64_t>(pool.num_threads(), hw), 1);
}

// Runs fn(i) for i in [0, n) on the caller and up to Workers(pool) - 1 helpers; returns when
// every i has run.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::function<void(int64_t)> fn;
    int64_t n;
  };
  auto st = std::make_shared<State>();
  st->fn = fn;
  st->n = n;
  auto work = [st]() {
    for (int64_t i = st->next.fetch_add(1); i < st->n; i = st->next.fetch_add(1)) {
      st->fn(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(Workers(pool), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// fn(i) for i in [0, n): on the calling thread alone when `serial` (too little work to hand
// out), else by ParallelFor.
inline void ForEach(xla::ffi::ThreadPool& pool, int64_t n, bool serial,
                    const std::function<void(int64_t)>& fn) {
  if (serial || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  } else {
    ParallelFor(pool, n, fn);
  }
}

}  // namespace arca_jax

#endif  // ARCA_JAX_PARALLEL_FOR_H_
