"""The CPU decode attention's key layout: q . k over keys stored [B, K, S, H] (a horizontal sum of
each slot's H values) against [B, K, H, S] (`qwen3.KVCache.transposed_keys`: a sum over the
second-minor axis, vectorised along the slots), in a loop shaped like the sampler's decode: per
step and layer, each row's new key and value written at its slot, then attention over the whole
cache (what "reduce" does in caches of fewer than `REDUCE_MIN_BLOCKS` blocks). Not a test: times.

    python experiments/bench_decode_attention.py [--slots 112] [--rows 128] [--steps 70]

Defaults: the embedded demo's rollout (128 rows, 2 kv heads x 2 query heads each, head_dim 32,
32 prompt slots + 80 new tokens, 3 layers). Prints ms per layer and step (median of 5 loops) and
the cores busy (process CPU time / wall time).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from arca_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()  # as the trainer's commands do, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax.qwen3 import cache_attention  # noqa: E402
from arca_jax.qwen3.inference import _write_rows  # noqa: E402


def attend_keys_bksh(q, k, v, bias):
    """The "reduce" attention as it was with keys [B, K, S, H]: q . k summed over the minor H."""
    B, _, N, H = q.shape
    K = k.shape[1]
    q1 = q.reshape(B, K, N // K, H)
    scores = jnp.sum(q1[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) * H ** -0.5
    probs = jax.nn.softmax(scores + bias[:, None], axis=-1)
    return jnp.sum(probs[..., None] * v[:, :, None], axis=-2).reshape(B, 1, N * H)


def make_loop(transposed: bool, B, K, G, H, S, L, steps, prompt):
    def step(i, carry):
        q, caches = carry
        index = jnp.full((B,), prompt, jnp.int32) + i
        bias = jnp.where(jnp.arange(S)[None, None] <= index[:, None, None], 0.0,
                         jnp.finfo(jnp.float32).min)  # [B, 1, S]
        out = []
        for layer in range(L):
            k, v = caches[2 * layer], caches[2 * layer + 1]
            new = q[:, :, :K].transpose(0, 2, 1, 3)  # [B, K, 1, H]
            if transposed:
                k = _write_rows(k, new.transpose(0, 1, 3, 2), index, axis=3)
                attn = cache_attention.attend(q, k, v, bias, "reduce")
            else:
                k = _write_rows(k, new, index, axis=2)
                attn = attend_keys_bksh(q, k, v, bias)
            v = _write_rows(v, q[:, :, K:2 * K].transpose(0, 2, 1, 3), index, axis=2)
            out += [k, v]
            q = jnp.tanh(attn.reshape(B, 1, K * G, H))
        return q, tuple(out)

    return jax.jit(lambda q, caches: jax.lax.fori_loop(0, steps, step, (q, caches)),
                   donate_argnums=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--slots", type=int, default=112)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()
    B, K, G, H, S, L = args.rows, 2, 2, 32, args.slots, args.layers
    if args.prompt + args.steps > S:
        raise SystemExit(f"--prompt + --steps must fit in --slots {S}")
    key = jax.random.PRNGKey(0)
    q0 = jax.random.normal(key, (B, 1, K * G, H))
    for transposed in (False, True, False, True):
        shape_k = (B, K, H, S) if transposed else (B, K, S, H)
        caches = tuple(jax.random.normal(jax.random.fold_in(key, i),
                                         shape_k if i % 2 == 0 else (B, K, S, H))
                       for i in range(2 * L))
        loop = make_loop(transposed, B, K, G, H, S, L, args.steps, args.prompt)
        q, caches = loop(q0, caches)
        jax.block_until_ready(q)
        times = []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(5):
            t = time.perf_counter()
            q, caches = loop(q, caches)
            jax.block_until_ready(q)
            times.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        per = statistics.median(times) / (args.steps * L) * 1e3
        print(f"keys {'[B, K, H, S]' if transposed else '[B, K, S, H]'}: {per:.3f} ms per layer "
              f"and step, {cpu / wall:.2f} cores busy ({S} slots, {B} rows)")


if __name__ == "__main__":
    main()
