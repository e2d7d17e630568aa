"""Where a decode step's time goes on a GPU (not a test).

Qwen3-1.7B shapes, random bfloat16 weights, batch 64, prompt 128, 512 new tokens (no EOS), the
sampler's own prefill and decode programs (`sampling.prefill_jit`, `sampling.decode_jit`):

1. decode ms/step (median of `--runs` after a compile run), against the nominal-bandwidth bound
   (the vendor's HBM bandwidth over the bytes a step must read: the prepared weights and the
   filled cache, mean over the steps), as `bench_sampling.py --gpu` reports it;
2. with `--profile`, one traced decode loop: the device's kernels grouped by kind (matmuls, the
   Pallas attention kernel, fusions, copies), per step, the time the device was busy (union of
   kernel intervals) and idle, and the kernels that took the most time;
3. with `--sweep`, the Pallas decode kernel alone over one layer's cache filled to the mean
   length (384 of 640 slots), for each chunk / block length of `--sweep`, 28 calls per program
   (one per layer, distinct caches): its time and bandwidth over the bytes it must read; then the
   whole decode loop again with each setting that beat the default alone by more than 3%.

XLA options come from XLA_FLAGS (e.g. command buffers: `--xla_gpu_enable_command_buffer=`), so a
driver runs this once per set of flags; the JSON records them.

    python experiments/profile_decode_gpu.py [--profile] [--sweep 128:64 256:64 ...] [--json F]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax import lora, qwen3, sampling  # noqa: E402
from arca_jax.qwen3 import cache_attention  # noqa: E402
import results_io  # noqa: E402
from experiments.bench_grpo import kernel_account, random_lora  # noqa: E402
from experiments.bench_sampling import GPU_TINY, NOMINAL_HBM, block, now, random_params  # noqa: E402

T_START = now()

# Kernel-name fragments of the decode account's categories, first match wins (the Pallas kernel
# is named after its pallas_call, "mha_forward").
DECODE_CATEGORIES = (
    ("attention (Pallas mha_forward)", ("mha_forward", "attn")),
    ("matmul (cuBLAS / nvjet / Triton GEMM)", ("gemm", "nvjet", "cutlass", "xmma", "cublas",
                                              "sm90_", "dot")),
    ("copies and memsets", ("memcpy", "memset", "copy", "transpose")),
    ("dynamic-update-slice (cache writes)", ("dynamic_update_slice", "scatter")),
    ("fusions (elementwise, reductions)", ("fusion", "loop_", "reduce", "triton", "convert",
                                          "concatenate", "gather", "select")),
)


def decode_setup(args, config):
    B, P, N = args.batch, args.prompt, args.new_tokens
    params = block(random_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    ids = jax.random.randint(jax.random.PRNGKey(1), (B, P), 1, config.vocab_size, jnp.int32)
    mask = jnp.ones((B, P), jnp.int32)
    settings = sampling.SamplingConfig(max_new_tokens=N, top_k=args.top_k, top_p=args.top_p)
    adapter = None
    if args.lora_rank:  # the trainer's GPU rollout: the adapter unmerged, bf16 base
        lcfg = lora.LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        adapter = (block(jax.jit(lambda k: random_lora(config, lcfg, k))(jax.random.PRNGKey(4))),
                   lcfg.scaling)
    return params, ids, mask, settings, adapter


def time_decode(args, config, params, ids, mask, settings, adapter, runs: int, trace_dir=None):
    """(weight bytes, median decode seconds, compile seconds, all decode seconds, kernel account
    or None) of the sampler's decode loop."""
    tree, scale = adapter or (None, 1.0)
    w = block(sampling.prepare_weights_jit(params, config, lora=tree, lora_scale=jnp.float32(scale),
                                           merge_lora=False, decode_attention="pallas"))

    def run(seed):
        st = block(sampling.prefill_jit(w, ids, mask, config=config, settings=settings,
                                        rng=jax.random.PRNGKey(seed)))
        t = now()
        st = block(sampling.decode_jit(w, st, config=config, settings=settings))
        return now() - t, st

    t = now()
    run(0)
    compile_s = now() - t
    times = [run(r + 1)[0] for r in range(runs)]
    account = None
    if trace_dir is not None:
        st = block(sampling.prefill_jit(w, ids, mask, config=config, settings=settings,
                                        rng=jax.random.PRNGKey(99)))
        t = now()
        with jax.profiler.trace(trace_dir):
            block(sampling.decode_jit(w, st, config=config, settings=settings))
        wall = now() - t
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        account = kernel_account(paths[0], args.new_tokens - 1, wall, DECODE_CATEGORIES)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(w))
    return weight_bytes, statistics.median(times), compile_s, times, account


def attention_alone(config, B, needed, filled, chunk, blk, layers, repeats=5):
    """Seconds of `layers` calls of the Pallas decode attention (one per layer, distinct caches)
    over B rows filled to `filled` of a cache for `needed` positions (`cache_size` slots for this
    chunk), with chunk / block lengths (`PALLAS_CHUNK`, `PALLAS_BLOCK`), median of `repeats`
    after a compile run."""
    K, N, H = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    key = jax.random.PRNGKey(3)
    saved = cache_attention.PALLAS_CHUNK, cache_attention.PALLAS_BLOCK
    cache_attention.PALLAS_CHUNK = chunk
    S = cache_attention.cache_size(needed, "pallas")
    cache_attention.PALLAS_CHUNK = saved[0]
    # separate k and v arrays per layer: slices of one stacked array would be copied before
    # each kernel call (2026-12-04's sweep timed those copies too)
    caches = [tuple(jax.random.normal(jax.random.fold_in(key, 2 * i + j), (B, K, S, H),
                                      jnp.bfloat16) for j in range(2)) for i in range(layers)]
    q = jax.random.normal(key, (B, 1, N, H), jnp.bfloat16)
    valid = jnp.broadcast_to(jnp.arange(S) < filled, (B, S))
    index = jnp.full((B,), filled - 1, jnp.int32)
    cache_attention.PALLAS_CHUNK, cache_attention.PALLAS_BLOCK = chunk, blk
    try:
        fn = jax.jit(lambda q, caches: sum(
            cache_attention.attend_pallas(q, c[0], c[1], valid, index).astype(jnp.float32)
            for c in caches))
        block(fn(q, caches))
        ts = []
        for _ in range(repeats):
            t = now()
            block(fn(q, caches))
            ts.append(now() - t)
    finally:
        cache_attention.PALLAS_CHUNK, cache_attention.PALLAS_BLOCK = saved
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, to check the code path")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="sample with a random adapter of this rank on the seven projections, "
                         "unmerged (the trainer's rollout on GPU)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=[],
                    help="chunk:block settings of the Pallas kernel to time alone, e.g. 256:64 "
                         "(the cache is allocated in whole chunks: 768 slots for 128 + 512 "
                         "tokens in chunks of 256); the two best beyond 3%% of the default are "
                         "then timed in the whole decode loop")
    ap.add_argument("--label", default="default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = jax.devices()[0]
    if args.tiny:
        config = qwen3.Qwen3Config(**GPU_TINY)
        args.batch, args.prompt, args.new_tokens = 4, 16, 32
    else:
        config = qwen3.preset("Qwen3-1.7B")
    B, P, N = args.batch, args.prompt, args.new_tokens
    nominal = NOMINAL_HBM.get(dev.device_kind)
    res = dict(label=args.label, device=dev.device_kind, jax=jax.__version__,
               xla_flags=os.environ.get("XLA_FLAGS", ""), batch=B, prompt=P, new_tokens=N,
               lora_rank=args.lora_rank, top_k=args.top_k, top_p=args.top_p,
               nominal_hbm_bytes_per_s=nominal, runs=[])
    path = results_io.json_path(args.json, f"profile_decode_{args.label}.json")

    def save():
        results_io.write_json(path, res)

    kv_slot = 2 * config.num_hidden_layers * B * config.num_key_value_heads * config.head_dim * 2
    kv_filled = kv_slot * (P + N / 2)
    params, ids, mask, settings, adapter = decode_setup(args, config)

    def decode_run(name, chunk, blk, trace):
        cache_attention.PALLAS_CHUNK, cache_attention.PALLAS_BLOCK = chunk, blk
        jax.clear_caches()
        with tempfile.TemporaryDirectory() as d:
            wb, dec, comp, times, acc = time_decode(args, config, params, ids, mask, settings,
                                                    adapter, args.runs, d if trace else None)
        step = dec / (N - 1)
        must = wb + kv_filled
        r = dict(name=name, pallas_chunk=chunk, pallas_block=blk, compile_and_first_run_s=comp,
                 decode_s=times, decode_step_ms=step * 1e3, decode_tokens_per_s=B * (N - 1) / dec,
                 weight_bytes=wb, bytes_must_read=must,
                 fraction_of_nominal_bound=(must / nominal / step) if nominal else None,
                 profile=acc)
        if acc:  # tracing slows the host, so the idle time is taken against the untraced step
            r["idle_ms_per_untraced_step"] = step * 1e3 - acc["busy_ms_per_step"]
        res["runs"].append(r)
        save()
        frac = r["fraction_of_nominal_bound"]
        print(f"[{args.label} {name}] decode {step * 1e3:.3f} ms/step, {r['decode_tokens_per_s']:.0f}"
              f" tok/s, {'' if frac is None else f'{frac:.3f} of the nominal bound, '}compile "
              f"{comp:.1f} s   [{now() - T_START:.0f} s]", flush=True)
        if acc:
            print(f"  profile: {acc['wall_ms_per_step']:.3f} ms/step traced, busy "
                  f"{acc['busy_ms_per_step']:.3f}, idle {r['idle_ms_per_untraced_step']:.3f} "
                  f"of the untraced step, "
                  f"{acc['kernel_launches_per_step']:.0f} kernels/step; "
                  + ", ".join(f"{c} {ms:.3f}" for c, ms in acc["categories_ms_per_step"].items()),
                  flush=True)
            for n, ms in acc["top_kernels_ms_per_step"][:15]:
                print(f"    {ms:7.4f} ms  {n[:110]}")
        return r

    default = (cache_attention.PALLAS_CHUNK, cache_attention.PALLAS_BLOCK)
    decode_run("pallas", *default, args.profile)
    if args.sweep:
        filled = P + N // 2
        L = config.num_hidden_layers
        attn_bytes = B * config.num_key_value_heads * filled * config.head_dim * 2 * 2
        alone = {}
        for s in dict.fromkeys([f"{default[0]}:{default[1]}"] + args.sweep):
            chunk, blk = (int(x) for x in s.split(":"))
            try:
                sec = attention_alone(config, B, P + N, filled, chunk, blk, L)
            except Exception as e:  # a setting the kernel refuses
                print(f"  attention alone {s}: failed {type(e).__name__}: {str(e)[:160]}")
                continue
            alone[s] = sec
            print(f"  attention alone chunk {chunk} block {blk}: {sec / L * 1e6:.1f} us per layer, "
                  f"{attn_bytes * L / sec / 1e12:.2f} TB/s over the filled cache", flush=True)
        res["attention_alone"] = dict(filled=filled, needed=P + N, layers=L,
                                      bytes_per_layer=attn_bytes,
                                      seconds={k: v for k, v in alone.items()})
        save()
        base = alone.get(f"{default[0]}:{default[1]}")
        better = sorted((v, k) for k, v in alone.items() if base and v < 0.97 * base)[:2]
        for _, s in better:
            chunk, blk = (int(x) for x in s.split(":"))
            decode_run(f"pallas {s}", chunk, blk, False)
    res["total_s"] = now() - T_START
    save()
    print(f"total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
