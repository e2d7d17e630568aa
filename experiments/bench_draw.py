"""The cost of choosing one token per row (`draw.choose_tokens`), alone (not a test).

Logits [B, V] float32 (default: the paper's rollout, 32 rows, Qwen3's vocabulary of 151,936) on
the default backend; for each sampling setting, the median time of `--repeats` calls of a jitted
program that draws `--draws` times in a row (a `lax.fori_loop`, each draw on new logits made by
one add; that add is timed alone and taken off), per draw. Settings: greedy; temperature 1 over
the whole vocabulary (inverse CDF); top-k 50; top-k 50 then top-p 0.95 (the paper's); top-p 0.95
alone (a sort over the vocabulary). Then the candidate search of a top-k draw two ways: `lax.top_k`
over the vocabulary (what `draw.top_candidates` runs off CPU: XLA:GPU has a kernel for k <= 16
and otherwise may sort each row) and `draw.threshold_top_k` (on CPU: the m-th largest value
found bit by bit with 32 counting passes, then the tokens at or above it).

    python experiments/bench_draw.py [--batch 32] [--vocab 151936] [--json F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax import draw, sampling  # noqa: E402
import results_io  # noqa: E402

SETTINGS = {
    "greedy": dict(greedy=True),
    "temperature 1": dict(),
    "top-k 50": dict(top_k=50),
    "top-k 50, top-p 0.95": dict(top_k=50, top_p=0.95),
    "top-p 0.95": dict(top_p=0.95),
}


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    B, V, n = args.batch, args.vocab, args.draws
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (B, V), jnp.float32)
    u = jax.random.uniform(jax.random.PRNGKey(1), (B,), jnp.float32, 1e-6, 1.0)

    def looped(per_draw):
        """A jitted program of n draws on new logits each (one add, so nothing is hoisted);
        per_draw(x [B, V]) -> [B] float32 feeds the next draw's logits."""
        @jax.jit
        def run(logits):
            def body(i, acc):
                return acc + per_draw(logits + acc[:, None])
            return jax.lax.fori_loop(0, n, body, jnp.zeros((B,), jnp.float32))
        return run

    def choose(settings):
        def per_draw(x):
            c = draw.choose_tokens(x, u, settings)
            return 1e-3 * c.logps + 1e-6 * c.tokens
        return per_draw

    base = timed(looped(lambda x: 1e-3 * x[:, 0]), logits, repeats=args.repeats) / n  # the add
    dev = jax.devices()[0]
    res = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, batch=B,
               vocab=V, draws=n, add_alone_us=base * 1e6, settings={})
    print(f"{dev.device_kind} ({dev.platform}), logits [{B}, {V}] float32; the add alone "
          f"{base * 1e6:.1f} us per draw")
    for name in args.settings:
        settings = sampling.SamplingConfig(max_new_tokens=1, **SETTINGS[name])
        sec = timed(looped(choose(settings)), logits, repeats=args.repeats) / n - base
        res["settings"][name] = sec * 1e6
        print(f"  {name:22s} {sec * 1e6:9.1f} us per draw")
    m = 2 * 50  # `draw._top_k_draw`'s candidates for top-k 50
    res["candidates_of_top_k_50_us"] = {}
    ref, _ = jax.lax.top_k(logits, m)
    for name, fn in (("lax.top_k", lambda x: jax.lax.top_k(x, m)),
                     ("threshold_top_k", lambda x: draw.threshold_top_k(x, m))):
        vals, _ = jax.jit(fn)(logits)
        assert bool(jnp.all(vals == ref)), name  # the same values, in the same order

        def per_draw(x, fn=fn):
            v, ids = fn(x)
            return 1e-3 * v[:, -1] + 1e-6 * ids[:, 0]
        sec = timed(looped(per_draw), logits, repeats=args.repeats) / n - base
        res["candidates_of_top_k_50_us"][name] = sec * 1e6
        print(f"  the {m} candidates by {name:16s} {sec * 1e6:9.1f} us per draw")
    results_io.write_json(results_io.json_path(args.json, "bench_draw.json"), res)


if __name__ == "__main__":
    main()
