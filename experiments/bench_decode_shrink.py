"""The demo rollout's decode loop with 0-3 halvings of its slots (`sampling.decode(shrink=k)`),
in one process, rounds interleaved: where `sampling.CPU_SHRINK` comes from. Not a test: times
only (and a check that every variant writes the same tokens).

    python experiments/bench_decode_shrink.py [--rounds 11] [--halvings 0,1,2,3]

The loop's input is the state the demo's training rollout decodes from (`profile_rollout.py
--merge`'s settings: embedded config, merged weights, 16 prompts x 8 completions, up to 80
tokens), captured after that script's warm-up rollouts; each variant is compiled ahead, then
every round calls each once on that same state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arca_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()  # as `arca-jax train` does, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax import sampling  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--halvings", default="0,1,2,3")
    args = ap.parse_args()
    captured = {}
    decode_jit = sampling.decode_jit

    def record(weights, state, **static):  # the first decode's input, copied before donation
        captured.setdefault("args", (weights, jax.tree_util.tree_map(jnp.copy, state), static))
        return decode_jit(weights, state, **static)

    sampling.decode_jit = record
    import profile_rollout
    argv, sys.argv = sys.argv, [sys.argv[0], "--merge", "--set", "rollout.shrink=0",
                           "--set", "rollout.replicas=1"]
    try:
        profile_rollout.main()  # prints its own rollout times (shrink 0)
    finally:
        sys.argv, sampling.decode_jit = argv, decode_jit
    weights, state, static = captured["args"]
    run = jax.jit(sampling.decode, static_argnames=("config", "settings", "mesh", "shrink"))
    programs = {k: run.lower(weights, state, **dict(static, shrink=k)).compile()
                for k in map(int, args.halvings.split(","))}
    outs = {k: p(weights, state) for k, p in programs.items()}
    ref = outs[min(outs)]
    for k, o in outs.items():
        print(f"shrink {k}: slot-steps {int(o.slot_steps)}, tokens equal to shrink {min(outs)}: "
              f"{bool(jnp.all(o.tokens == ref.tokens))}, max |logp diff| "
              f"{float(jnp.max(jnp.abs(o.logps - ref.logps))):.1e}")
    times = {k: [] for k in programs}
    for _ in range(args.rounds):
        for k, p in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(p(weights, state))
            times[k].append(time.perf_counter() - t0)
    print(f"load average {os.getloadavg()[0]:.2f}; decode loop, medians of {args.rounds}:")
    for k, ts in times.items():
        print(f"shrink {k}: median {statistics.median(ts) * 1e3:7.1f} ms   best "
              f"{min(ts) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
