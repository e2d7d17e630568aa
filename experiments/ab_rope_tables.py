"""The train step with the rotary tables as `qwen3.common.rope_tables` computes them (cos and
sin of the H / 2 angles once, behind an optimization barrier) against the tables left to XLA's
fusion (computed inside every consumer: each layer's rotary embedding of q and k, forward and
backward, per head), on the demo's packed batch. Not a test: times only, in one process, the
two programs alternating; prints the largest difference of their outputs and how many cosine
operations each program holds.

    python experiments/ab_rope_tables.py [--rounds 15] [--weightings arca,uniform]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from arca_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def fused_tables(positions, head_dim, theta):
    """`rope_tables` without the barrier (as before it): cos and sin of the duplicated angles."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--weightings", default="arca,uniform")
    args = ap.parse_args()

    import profile_update as pu
    from arca_jax import hf
    from arca_jax.config import ModelConfig
    from arca_jax.grpo import GRPOConfig, TrainState, make_optimizer, make_train_step
    from arca_jax.qwen3 import model as qwen3_model
    from arca_jax.trainer.programs import StepPrograms

    batch, _ = pu.demo_batch(mean_len=43, prompt_tokens=(14, 26))
    B = batch.input_ids.shape[0]
    pb = StepPrograms(None, rows=B, share_prompts=True, line_width=4).pack(batch)
    config, params = hf.load_pretrained(ModelConfig().resolved_path(), dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    lcfg, tree = pu.demo_adapter(config, key)
    opt = make_optimizer(2e-3, warmup_steps=5, total_steps=20)
    library = qwen3_model.rope_tables
    fns = {}
    for wt in args.weightings.split(","):
        outs = {}
        for variant, tables in (("fused", fused_tables), ("barrier", library)):
            qwen3_model.rope_tables = tables
            try:
                fn = make_train_step(config, GRPOConfig(weighting=wt), opt,
                                     lora_scale=lcfg.scaling, donate=False)
                state = TrainState.create(jax.tree_util.tree_map(jnp.copy, tree), opt, key)
                comp = fn.lower(state, params, pb).compile()
            finally:
                qwen3_model.rope_tables = library
            print(f"{wt} step, tables {variant}: {comp.as_text().count(' cosine(')} cosine "
                  "operations in the program")
            f = (lambda comp, state: lambda: comp(state, params, pb))(comp, state)
            outs[variant] = jax.block_until_ready(f())
            fns[f"{wt} step, tables {variant}"] = f
        diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                      outs["fused"], outs["barrier"])
        print(f"{wt} step: max |barrier - fused| over state and metrics "
              f"{max(jax.tree_util.tree_leaves(diff)):.2e}")
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[n].append(time.perf_counter() - t0)
    for n, t in times.items():
        print(f"{n:32s} median {statistics.median(t) * 1e3:8.1f} ms  best {min(t) * 1e3:8.1f} ms")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
