// A call's phases run by the caller and helpers of XLA's CPU thread pool that stay for the whole
// call (included by decode_layers.cc).
//
// `ParallelFor` (parallel_for.h) schedules its helpers anew for every call, and a pool thread
// that sleeps between calls starts tens of microseconds after the caller. A decode step's
// layers are some thirty dependent steps of a few microseconds to a hundred each. `RunPhases`
// schedules the helpers once, at the start, and the phases follow one another through two
// counters each: the caller and whoever has arrived take a phase's tasks by an atomic counter;
// the caller waits until every task taken has finished and opens the next phase. A waiting
// thread spins with a pause and yields its core every few turns: on a host with more pool
// threads than cores (two CPU devices per core), a late caller or helper gets the core back
// sooner (the CPU benchmark's decode loop on a 2-core Zen 3 with four devices, medians of 10
// rounds in one process: 234 ms yielding every 4096 turns, 230 every 256, 226 every 16). A
// helper that arrives late joins the phase then running, or finds the call over and returns; it
// never runs a task the caller has not waited for.
#ifndef ARCA_JAX_TEAM_H_
#define ARCA_JAX_TEAM_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace arca_jax {

// One phase: `count` tasks fn(0) .. fn(count - 1), run in any order and at once; a `serial`
// phase runs on the caller alone (its helpers wait).
struct Phase {
  int64_t count;
  bool serial;
  std::function<void(int64_t)> fn;
};

namespace team {

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr int kSpinsPerYield = 16;

// Owned by the caller and every helper (a helper may outlive the call). The phases' functions
// are the caller's: a helper calls one only for a task it has taken, which the caller waits for.
struct State {
  explicit State(const std::vector<Phase>& phases)
      : n(static_cast<int>(phases.size())), next(new std::atomic<int64_t>[n]),
        done(new std::atomic<int64_t>[n]) {
    for (const Phase& p : phases) {
      count.push_back(p.count);
      serial.push_back(p.serial);
      fn.push_back(&p.fn);
    }
    for (int p = 0; p < n; ++p) {
      next[p].store(0, std::memory_order_relaxed);
      done[p].store(0, std::memory_order_relaxed);
    }
  }
  const int n;
  std::atomic<int> phase{0};  // the phase open now; n once the call is over
  std::unique_ptr<std::atomic<int64_t>[]> next, done;
  std::vector<int64_t> count;
  std::vector<bool> serial;
  std::vector<const std::function<void(int64_t)>*> fn;
};

// Takes phase p's tasks until none is left.
inline void Work(State& st, int p) {
  const int64_t n = st.count[p];
  for (int64_t i = st.next[p].fetch_add(1, std::memory_order_relaxed); i < n;
       i = st.next[p].fetch_add(1, std::memory_order_relaxed)) {
    (*st.fn[p])(i);
    st.done[p].fetch_add(1, std::memory_order_release);
  }
}

inline void Help(State& st) {
  int p = st.phase.load(std::memory_order_acquire);
  while (p < st.n) {
    if (!st.serial[p]) Work(st, p);
    int q, spins = 0;
    while ((q = st.phase.load(std::memory_order_acquire)) == p) {
      Pause();
      if (++spins == kSpinsPerYield) {
        spins = 0;
        std::this_thread::yield();
      }
    }
    p = q;
  }
}

}  // namespace team

// Runs the phases in order (each one's tasks all finished before the next starts) on the caller
// and Workers(pool) - 1 helpers of the pool (none when `helpers` is false).
inline void RunPhases(xla::ffi::ThreadPool& pool, const std::vector<Phase>& phases, bool helpers) {
  auto st = std::make_shared<team::State>(phases);
  const int64_t extra = helpers ? Workers(pool) - 1 : 0;
  for (int64_t h = 0; h < extra; ++h) pool.Schedule([st] { team::Help(*st); });
  for (int p = 0; p < st->n; ++p) {
    if (st->serial[p]) {
      for (int64_t i = 0; i < st->count[p]; ++i) (*st->fn[p])(i);
    } else {
      team::Work(*st, p);
      int spins = 0;
      while (st->done[p].load(std::memory_order_acquire) < st->count[p]) {
        team::Pause();
        if (++spins == team::kSpinsPerYield) {
          spins = 0;
          std::this_thread::yield();
        }
      }
    }
    st->phase.store(p + 1, std::memory_order_release);
  }
}

}  // namespace arca_jax

#endif  // ARCA_JAX_TEAM_H_
