"""Seconds to trace and lower the sampler's two model programs (no compile, no weights).

A decode program is traced again for every new prompt width, so its tracing is part of every
run's first steps. Abstract inputs (`jax.eval_shape`), a fresh jit and cleared caches per try,
best of three:

    python experiments/bench_trace.py                 # the tiny demo model and Qwen3-1.7B shapes
    python experiments/bench_trace.py --repo DIR      # another checkout of arca_jax, to compare
"""

import argparse
import sys
import time


def measure(qwen3, config, batch: int, prompt: int, new: int, tries: int = 3) -> dict:
    import jax
    import jax.numpy as jnp

    params = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0)))
    weights = jax.eval_shape(
        lambda p: qwen3.inference_weights(p, config, decode_attention="reduce"), params)
    cache = jax.eval_shape(lambda: qwen3.KVCache.init(config, batch, prompt + new))
    out = {}
    for width, name in ((1, "decode_step"), (prompt, "prefill")):
        ids = jax.ShapeDtypeStruct((batch, width), jnp.int32)
        trace = lower = float("inf")
        for _ in range(tries):
            jax.clear_caches()
            f = jax.jit(qwen3.inference_forward, static_argnames="config")
            t0 = time.perf_counter()
            traced = f.trace(weights, ids, config=config, positions=ids, attention_mask=ids,
                             cache=cache)
            t1 = time.perf_counter()
            traced.lower()
            t2 = time.perf_counter()
            trace, lower = min(trace, t1 - t0), min(lower, t2 - t1)
        out[name] = {"trace_s": round(trace, 3), "lower_s": round(lower, 3)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=None, help="checkout whose arca_jax to import")
    args = ap.parse_args(argv)
    if args.repo:
        sys.path.insert(0, args.repo)
    from arca_jax import qwen3

    tiny = qwen3.Qwen3Config(vocab_size=99, hidden_size=128, intermediate_size=384,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, tie_word_embeddings=True)
    cases = [("tiny demo model, 16 rows, 32 + 80 tokens", tiny, 16, 32, 80),
             ("Qwen3-1.7B shapes, 32 rows, 512 + 512 tokens", qwen3.preset("Qwen3-1.7B"), 32,
              512, 512)]
    for label, config, batch, prompt, new in cases:
        print(label, measure(qwen3, config, batch, prompt, new), flush=True)


if __name__ == "__main__":
    main()
