"""The packed train step's attention, the C++ kernel (`qwen3.cpu_attention`, "cpu-kernel")
against the einsum attention's causal blocks (`qwen3.einsum_attention`, "einsum"), on the
demo's packed batch shape. Not a test: times only (tests/model/test_cpu_attention.py checks the
values).

    python experiments/cpu_attention/ab_cpu_attention.py [--rounds 9] [--weightings arca,uniform]

1. One layer's attention (forward; forward + backward), both implementations.
2. The whole jitted train step of that batch with `GRPOConfig(attention=...)` "einsum" and
   "cpu-kernel", rounds interleaved, medians; the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from arca_jax import host_memory  # noqa: E402

host_memory.reuse_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax.qwen3 import cpu_attention, cpu_kernels  # noqa: E402


def kernel_blocks(q, k, v, visible):
    """The model's layout (q [B, T, K, G, H], k, v [B, S, K, H]) through the kernel."""
    qh = jnp.transpose(q, (0, 2, 3, 1, 4))
    kh, vh = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))
    return jnp.transpose(cpu_attention.attention(qh, kh, vh, visible), (0, 3, 1, 2, 4))


def timed(fns, rounds):
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--weightings", default="arca,uniform")
    args = ap.parse_args()
    if not cpu_kernels.available():
        sys.exit(f"the CPU attention kernel is not available: {cpu_kernels.error()}")

    import profile_update as pu
    from arca_jax import hf
    from arca_jax.config import ModelConfig
    from arca_jax.grpo import GRPOConfig, TrainState, make_optimizer, make_train_step
    from arca_jax.qwen3.einsum_attention import causal_blocks, masked_attention
    from arca_jax.trainer.programs import StepPrograms

    batch, _ = pu.demo_batch(mean_len=43, prompt_tokens=(14, 26))
    B = batch.input_ids.shape[0]
    pb = StepPrograms(None, rows=B, share_prompts=True).pack(batch)
    seg, pre = np.asarray(pb.packing.segments), np.asarray(pb.packing.prefix)
    L, W = seg.shape
    vis = (np.tril(np.ones((W, W), bool))[None] & (seg[:, None, :] > 0)
           & ((seg[:, :, None] == seg[:, None, :]) | (pre[:, :, None] == seg[:, None, :])))
    tiles = vis.reshape(L, W, W // 16, 16).any(-1) if W % 16 == 0 else None
    print(f"packed batch: {L} lines of {W}; visible pairs {vis.sum()} of {L * W * W}"
          + (f"; key tiles visited {tiles.mean():.2f}" if tiles is not None else ""))
    vis = jnp.asarray(vis)
    config, params = hf.load_pretrained(ModelConfig().resolved_path(), dtype=jnp.float32)
    K, G, H = config.num_key_value_heads, config.num_groups, config.head_dim
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(L, W, K, G, H)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(L, W, K, H)).astype(np.float32)) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    layer = {"einsum": lambda q, k, v: causal_blocks(masked_attention, q, k, v, vis, 4),
             "kernel": lambda q, k, v: kernel_blocks(q, k, v, vis)}
    fns = {}
    for name, f in layer.items():
        fwd = jax.jit(f)
        both = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
        for n, g in ((f"{name} forward", fwd), (f"{name} forward+backward", both)):
            jax.block_until_ready(g(q, k, v))
            fns[n] = (lambda g: lambda: g(q, k, v))(g)
    for n, ms in timed(fns, 15).items():
        print(f"one layer's attention, {n:26s} {ms:8.2f} ms")

    key = jax.random.PRNGKey(0)
    lcfg, tree = pu.demo_adapter(config, key)
    opt = make_optimizer(2e-3, warmup_steps=5, total_steps=20)
    fns, outs = {}, {}
    for wt in args.weightings.split(","):
        for variant in ("einsum", "cpu-kernel"):
            fn = make_train_step(config, GRPOConfig(weighting=wt, attention=variant), opt,
                                 lora_scale=lcfg.scaling, donate=False)
            state = TrainState.create(jax.tree_util.tree_map(jnp.copy, tree), opt, key)
            t0 = time.perf_counter()
            comp = fn.lower(state, params, pb).compile()
            print(f"{wt} step, {variant}: compiled in {time.perf_counter() - t0:.1f} s")
            f = (lambda comp, state: lambda: comp(state, params, pb))(comp, state)
            outs[(wt, variant)] = jax.block_until_ready(f())
            fns[f"{wt} step, {variant}"] = f
        diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                      outs[(wt, "einsum")], outs[(wt, "cpu-kernel")])
        print(f"{wt} step: max |kernel - einsum| over state and metrics "
              f"{max(jax.tree_util.tree_leaves(diff)):.2e}")
    for n, ms in timed(fns, args.rounds).items():
        print(f"{n:24s} median {ms:8.1f} ms")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
