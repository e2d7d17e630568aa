"""Copies of cache arrays in the refill decode program, counted in its compiled HLO (not a test).

`sampling.decode` with refill (slots < rows) runs the steps in a loop of their own and admits
waiting rows between runs of it. Before, one loop's body was `lax.cond(admit now, admit, step)`,
and XLA gave that conditional's branches copies of the loop state, the cache among them
(experiments/NOTES_sampling.md, "Refill without a conditional in the steps' loop"). This script
compiles both structures for the same state and prints, for each, the `copy` instructions whose
result has a cache array's shape: in the whole module and inside its loops
(`plan.hlostats.loop_instructions`).

    python experiments/refill_copies.py                       # CPU, the CPU benchmark's model
    python experiments/refill_copies.py --topology v5e:2x2    # TPU, compile only (libtpu)
        --model Qwen3-1.7B --dtype bfloat16 --prompt 128 --new-tokens 512
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax import qwen3, sampling  # noqa: E402
from arca_jax.plan import hlostats  # noqa: E402
from arca_jax.sampling import _admit_now, _constrain, _running, admit, decode_step  # noqa: E402
import bench_sampling  # noqa: E402


def conditional_in_loop(weights, state, *, config, settings, mesh=None):
    """The earlier refill loop (no shrink): admission or a step, chosen in the loop's body."""
    step = functools.partial(decode_step, weights, config=config, settings=settings, mesh=mesh)
    refill = functools.partial(admit, weights, config=config, settings=settings,
                               count=state.admit_rows, mesh=mesh)
    return jax.lax.while_loop(_running, lambda s: jax.lax.cond(
        _admit_now(s), lambda s: _constrain(refill(s), mesh), step, s), state)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default=None, help="a TPU topology to compile for (libtpu)")
    ap.add_argument("--model", default=None, help="a `qwen3.preset` name (default: the CPU "
                    "benchmark's model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.topology:  # `tpu_target` sets libtpu's environment for the topology
        from arca_jax import plan
        device, platform = plan.tpu_target(args.topology).devices[0], "tpu"
    else:
        device, platform = jax.devices()[0], jax.default_backend()
    config = (qwen3.preset(args.model) if args.model
              else qwen3.Qwen3Config(**bench_sampling.CPU_MODEL))
    dtype = jnp.dtype(args.dtype)
    rows, G, P, N = args.prompts * args.group, args.group, args.prompt, args.new_tokens
    settings = sampling.SamplingConfig(max_new_tokens=N, eos_ids=(1,))
    attention = qwen3.default_decode_attention(platform, 1, dtype)
    params = jax.eval_shape(lambda k: qwen3.init_params(config, k, dtype), jax.random.PRNGKey(0))
    weights = jax.eval_shape(lambda p: sampling.prepare_weights(
        p, config, lora=None, lora_scale=jnp.float32(1.0), merge_lora=False,
        decode_attention=attention), params)
    ids = jax.ShapeDtypeStruct((rows, P), jnp.int32)
    state = jax.eval_shape(lambda w, i, m, r: sampling.prefill(
        w, i, m, config=config, settings=settings, rng=r, limit=jnp.int32(N), group_size=G,
        slots=args.slots, admit_rows=G), weights, ids, ids, jax.ShapeDtypeStruct((2,), jnp.uint32))
    placed = jax.sharding.SingleDeviceSharding(device)
    put = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), tree)
    weights, state = put(weights), put(state)
    hlo_dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    cache = {f"{hlo_dtype[jnp.dtype(a.dtype).name]}[{','.join(map(str, a.shape))}]"
             for a in (*state.cache.k, *state.cache.v)}
    print(f"{platform} ({device.device_kind}), {rows} rows in {args.slots} slots, G = {G}, "
          f"{P} + {N} tokens, {dtype.name}; cache arrays {sorted(cache)}")
    for name, fn in (("conditional in the loop (before)", conditional_in_loop),
                     ("sampling.decode", sampling.decode)):
        text = jax.jit(fn, static_argnames=("config", "settings", "mesh"),
                       donate_argnames="state").lower(
            weights, state, config=config, settings=settings).compile().as_text()
        module = hlostats.Module.parse(text)
        every = [i for instrs in module.computations.values() for i in instrs
                 if i.opcode in ("copy", "copy-start") and i.type.split("{")[0] in cache]
        looped = [i for i in hlostats.loop_instructions(text)
                  if i.opcode in ("copy", "copy-start") and i.type.split("{")[0] in cache]
        print(f"{name}: {len(every)} copies of cache arrays in the module, {len(looped)} "
              "inside its loops")


if __name__ == "__main__":
    main()
