"""Rollout speed of `arca_jax.sampling` (not a test).

CPU (default): tokens/s of `sampling.generate` against transformers' `generate` (PyTorch, KV cache,
multinomial sampling) on one random model (hidden 256, 4 layers, 8 heads / 4 KV heads, head_dim 32,
vocab 8192, MLP 768), batch 16, prompt 32, exactly 64 new tokens (no EOS), side by side in one run:
both warmed up, runs interleaved, medians reported. Prefill and decode throughput are printed
separately, with the operation count of one decode step (jaxpr equations, and the kernels of the
compiled loop body). Where the package's C++ kernels run (`qwen3.cpu_kernels`: the projections
over packed weights, the decode attention), a second arca_jax arm runs the same sampler on XLA's
own operations (`matmul="xla"`, `decode_attention="reduce"`, the defaults before the kernels).

    python experiments/bench_sampling.py [--runs 7] [--top-k K] [--top-p P]

`--top-k` / `--top-p` truncate both samplers' draws (transformers' warpers against
`arca_jax.draw`); the default, as in transformers' `generate` here, samples the whole vocabulary.

CPU, GRPO groups (`--groups`): 16 prompts x G = 8 completions of up to 128 tokens, with the
first 2% of the vocabulary ending a completion, so that completions end at varied lengths:
transformers' `generate` on the 128 rows against `sampling.generate` in one batch (each prompt
prefilled once per group), with continuous refill (64 slots) and with the slots halved as rows
end (`--shrink 3`: 128 -> 64 -> 32 -> 16). Tokens/s counts the kept completion tokens.

    python experiments/bench_sampling.py --groups [--runs 5]

On CPU JAX gets two devices per core (`replicas.use_cpu_cores`, as the trainer's commands do), and
both CPU cases add an arm sampling on `--replicas` of them at once (default: two per core;
`sampling.generate(devices=...)`, each device its own share of the rows; 1: no such arm).

GPU (`--gpu`): Qwen3-1.7B shapes, random bfloat16 weights, batch 64, prompt 128, 512 new tokens:
prefill and decode tokens/s, against the memory-bandwidth bound (bytes of weights plus KV cache
read per decode step over the HBM bandwidth measured in the same run by a large device-to-device
copy). Finishes in a few minutes including compilation; writes $OUT/bench_sampling_gpu.json when
OUT is set. `--gpu --tiny` runs the same code path with tiny shapes (any backend), to check it.

    python experiments/bench_sampling.py --gpu
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax import qwen3, replicas, sampling  # noqa: E402
import results_io  # noqa: E402

T_START = time.perf_counter()


def now() -> float:
    return time.perf_counter()


def block(x):
    return jax.block_until_ready(x)


def settle():
    """A pause before each timed arm: the previous arm's worker threads (torch's OpenMP pool
    spin-waits after a parallel region) stop competing for the cores first."""
    time.sleep(0.3)


# --------------------------------------------------------------------------------------------
# Operation counts
# --------------------------------------------------------------------------------------------

_TRIVIAL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def _hlo_computations(text: str):
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
        elif line.startswith("}"):
            cur = None
        elif cur is not None and " = " in line:
            comps[cur].append(line.strip())
    return comps, entry


def _opcode(line: str) -> str:
    rhs = re.sub(r"/\*.*?\*/", "", line.split(" = ", 1)[1])
    m = re.search(r"(?:^|\s)([a-z][\w\-]*)\(", rhs)
    return m.group(1) if m else "?"


def loop_body_kernels(hlo_text: str) -> Counter:
    """Non-trivial instructions (fusions, dots, copies, ...) run by one iteration of the outermost
    while loop of a compiled module: the kernels of one decode step. Nested loops (a scan over
    layers, the threefry loop) are multiplied by their known trip counts."""
    comps, entry = _hlo_computations(hlo_text)

    def walk(name, mult, acc):
        for line in comps.get(name, []):
            op = _opcode(line)
            if op in _TRIVIAL:
                continue
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                k = mult * (int(trip.group(1)) if trip else 1)
                for key in ("body", "condition"):
                    walk(re.search(key + r"=%?([\w.\-]+)", line).group(1), k, acc)
            elif op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|computations?)=\{?%?([\w.\-]+)", line):
                    walk(callee, mult, acc)
            else:
                acc[op] += mult
        return acc

    for line in comps[entry]:
        if _opcode(line) == "while":
            acc = Counter()
            for key in ("body", "condition"):
                walk(re.search(key + r"=%?([\w.\-]+)", line).group(1), 1, acc)
            return acc
    raise ValueError("no while loop in the module")


def jaxpr_equations(fn, *args) -> int:
    """Equations of fn's jaxpr, counting those inside nested jaxprs (scan bodies etc.) once each."""
    from jax.extend import core as jcore

    def count(j):
        n = 0
        for e in j.eqns:
            n += 1
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jcore.ClosedJaxpr):
                        n += count(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


# --------------------------------------------------------------------------------------------
# CPU: side by side with transformers
# --------------------------------------------------------------------------------------------

CPU_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 max_position_embeddings=1024, tie_word_embeddings=True)


def cpu_bench(args):
    # One straight-line benchmark (setup, interleaved timed runs, report): long, but split it would
    # only hand its dozen locals from piece to piece.
    import torch
    import transformers

    from arca_jax import hf

    B, P, N = args.batch, args.prompt, args.new_tokens
    config = qwen3.Qwen3Config(**CPU_MODEL)
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, config, params)
        model = transformers.Qwen3ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    rs = np.random.default_rng(0)
    ids = rs.integers(1, config.vocab_size, (B, P)).astype(np.int64)
    mask = np.ones((B, P), np.int64)
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"model: {CPU_MODEL}\nbatch {B}, prompt {P}, new tokens {N} (no EOS), float32, "
          f"top-k {args.top_k or 'off'}, top-p {args.top_p}")

    def hf_generate(n):
        with torch.no_grad():
            out = model.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True,
                                 top_k=args.top_k, top_p=args.top_p, temperature=1.0,
                                 max_new_tokens=n, min_new_tokens=n,
                                 use_cache=True, eos_token_id=None, pad_token_id=0)
        assert out.shape == (B, P + n), out.shape
        return out

    settings = sampling.SamplingConfig(max_new_tokens=N, top_k=args.top_k, top_p=args.top_p)

    def jax_run(seed, matmul=None, decode_attention=None):
        t0 = now()
        w = block(sampling.prepare_weights_jit(params, config, lora=None,
                                               lora_scale=jnp.float32(1.0), merge_lora=False,
                                               matmul=matmul, decode_attention=decode_attention))
        t1 = now()
        st = block(sampling.prefill_jit(w, j_ids, j_mask, config=config, settings=settings,
                                        rng=jax.random.PRNGKey(seed)))
        t2 = now()
        st = block(sampling.decode_jit(w, st, config=config, settings=settings))
        t3 = now()
        assert int(jnp.max(st.column)) == N
        return t1 - t0, t2 - t1, t3 - t2

    devices = replicas.devices(args.replicas)

    def jax_replicas(seed):  # prepare the weights, then prefill and decode on each device
        t0 = now()
        out = block(sampling.generate(params, j_ids, j_mask, config=config,
                                      rng=jax.random.PRNGKey(seed), max_new_tokens=N,
                                      top_k=args.top_k, top_p=args.top_p,
                                      bucket=False, devices=devices))
        assert int(out.num_steps) == N
        return now() - t0

    threads = sorted({1, torch.get_num_threads()})
    runs = {"jax_weights": [], "jax_prefill": [], "jax_decode": [], "jax_replicas": []}
    # the same sampler with XLA's operations instead of the C++ kernels (`qwen3.cpu_kernels`:
    # the packed-weight matmul, the decode attention): XLA's dots and the "reduce" attention
    xla_arm = qwen3.default_matmul(jnp.float32) == "cpu-kernel"
    xla_ops = dict(matmul="xla", decode_attention="reduce")
    runs.update({"xla_weights": [], "xla_prefill": [], "xla_decode": []})
    for th in threads:
        runs.update({f"hf{th}_prefill": [], f"hf{th}_total": []})

    t = now()
    jax_run(0)
    print(f"jax compile + first run: {now() - t:.1f} s")
    if xla_arm:
        jax_run(0, **xla_ops)
    if devices:
        jax_replicas(0)
    for th in threads:  # warm up
        torch.set_num_threads(th)
        hf_generate(N), hf_generate(1)
    for r in range(args.runs):  # interleaved, so all see the same machine load
        for th in threads:  # torch at 1 thread and at its default; the faster one is reported
            torch.set_num_threads(th)
            settle()
            t = now()
            hf_generate(1)
            runs[f"hf{th}_prefill"].append(now() - t)
            settle()
            t = now()
            hf_generate(N)
            runs[f"hf{th}_total"].append(now() - t)
        settle()
        a, b, c = jax_run(r + 1)
        runs["jax_weights"].append(a)
        runs["jax_prefill"].append(b)
        runs["jax_decode"].append(c)
        if xla_arm:
            settle()
            for key, value in zip(("xla_weights", "xla_prefill", "xla_decode"),
                                  jax_run(r + 1, **xla_ops)):
                runs[key].append(value)
        if devices:
            settle()
            runs["jax_replicas"].append(jax_replicas(r + 1))
    med = {k: statistics.median(v) for k, v in runs.items() if v}

    # one decode step: jaxpr equations and compiled kernels of the loop body
    w = sampling.prepare_weights_jit(params, config, lora=None, lora_scale=jnp.float32(1.0),
                                     merge_lora=False)
    st = sampling.prefill_jit(w, j_ids, j_mask, config=config, settings=settings,
                              rng=jax.random.PRNGKey(0))
    step = functools.partial(sampling.decode_step, config=config, settings=settings)
    eqns = jaxpr_equations(step, w, st)
    kernels = loop_body_kernels(sampling.decode_jit.lower(w, st, config=config, settings=settings)
                                .compile().as_text())

    best_th = min(threads, key=lambda th: med[f"hf{th}_total"])
    med["hf_prefill"], med["hf_total"] = med[f"hf{best_th}_prefill"], med[f"hf{best_th}_total"]
    hf_decode = med["hf_total"] - med["hf_prefill"]
    jax_total = med["jax_weights"] + med["jax_prefill"] + med["jax_decode"]
    rows = [(f"transformers {th} thr", med[f"hf{th}_prefill"],
             med[f"hf{th}_total"] - med[f"hf{th}_prefill"], med[f"hf{th}_total"]) for th in threads]
    rows.append(("arca_jax.sampling", med["jax_weights"] + med["jax_prefill"], med["jax_decode"],
                 jax_total))
    if xla_arm:
        rows.append(("arca_jax, XLA ops", med["xla_weights"] + med["xla_prefill"],
                     med["xla_decode"], med["xla_weights"] + med["xla_prefill"] + med["xla_decode"]))
    print(f"\nmedian of {args.runs} interleaved runs (prefill = prompt + first token; decode = "
          f"the other {N - 1} tokens; arca_jax prefill includes preparing the weights, "
          f"{med['jax_weights'] * 1e3:.2f} ms)")
    print(f"{'':22s} {'prefill ms':>11s} {'prompt tok/s':>13s} {'decode ms':>10s} "
          f"{'decode tok/s':>13s} {'total ms':>9s} {'tok/s':>9s}")
    result = {"machine": f"{os.cpu_count()} CPUs", "batch": B, "prompt": P, "new_tokens": N,
              "top_k": args.top_k, "top_p": args.top_p, "load_average": os.getloadavg()[0]}
    for name, pre, dec, tot in rows:
        print(f"{name:22s} {pre * 1e3:11.2f} {B * P / pre:13.0f} {dec * 1e3:10.2f} "
              f"{B * (N - 1) / dec:13.0f} {tot * 1e3:9.2f} {B * N / tot:9.0f}")
        result[name] = dict(prefill_s=pre, decode_s=dec, total_s=tot, tokens_per_s=B * N / tot,
                            decode_tokens_per_s=B * (N - 1) / dec, prompt_tokens_per_s=B * P / pre)
    if devices:
        tot = med["jax_replicas"]
        print(f"{f'arca_jax, {len(devices)} devices':22s} {'':11s} {'':13s} {'':10s} {'':13s} "
              f"{tot * 1e3:9.2f} {B * N / tot:9.0f}")
        result["replicas"] = dict(devices=len(devices), total_s=tot, tokens_per_s=B * N / tot,
                                  speedup=med["hf_total"] / tot)
        print(f"{len(devices)} devices at once: {med['hf_total'] / tot:.2f}x transformers end "
              f"to end")
    speedup = med["hf_total"] / jax_total
    jax_prefill = med["jax_weights"] + med["jax_prefill"]
    print(f"\nspeed-up over transformers (its faster setting, {best_th} thread(s)): "
          f"{speedup:.2f}x end to end, {hf_decode / med['jax_decode']:.2f}x decode, "
          f"{med['hf_prefill'] / jax_prefill:.2f}x prefill")
    print(f"one decode step: {eqns} jaxpr equations; {sum(kernels.values())} kernels in the "
          f"compiled loop body {dict(kernels.most_common())}")
    result.update(speedup=speedup, step=dict(jaxpr_equations=eqns, kernels=sum(kernels.values())))
    return result


# --------------------------------------------------------------------------------------------
# CPU: GRPO groups with EOS at varied lengths (shared prefill, continuous refill)
# --------------------------------------------------------------------------------------------


def groups_bench(args):
    """One GRPO rollout on the CPU model: Q prompts x G completions, EOS at varied lengths, up
    to N new tokens. transformers' `generate` (the prompts repeated G times, as TRL's
    GRPOTrainer calls it; it stops when every row has ended) against `sampling.generate` as one
    batch with the prompt shared per group, and with continuous refill (`max_batch` slots)."""
    import torch
    import transformers

    from arca_jax import hf

    Q, G, P, N = args.prompts, args.group, args.prompt, args.group_new_tokens
    B = Q * G
    config = qwen3.Qwen3Config(**CPU_MODEL)
    # the random model's next-token distributions are spread over the vocabulary: with the first
    # 2% of the ids ending a completion, lengths are near-geometric (mean ~50 of 128, ~12% cut)
    EOS = tuple(range(1, 1 + round(args.p_eos * config.vocab_size)))
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, config, params)
        model = transformers.Qwen3ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    rs = np.random.default_rng(0)
    prompts = rs.integers(len(EOS) + 1, config.vocab_size, (Q, P)).astype(np.int64)
    ids = np.repeat(prompts, G, axis=0)
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"model: {CPU_MODEL}\n{Q} prompts x G={G} = {B} rows, prompt {P}, up to {N} new "
          f"tokens, {len(EOS)} end tokens ({args.p_eos:.0%} of the vocabulary), float32")

    def hf_run(seed):
        torch.manual_seed(seed)
        t = now()
        with torch.no_grad():
            out = model.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=N, use_cache=True,
                                 eos_token_id=list(EOS), pad_token_id=0)
        dt = now() - t
        new = out[:, P:].numpy()
        ended = np.isin(new, EOS)
        lengths = np.where(ended.any(1), ended.argmax(1) + 1, N)
        return dt, lengths, int(new.shape[1]) * B

    def jax_run(seed, **kw):
        t = now()
        out = sampling.generate(params, j_ids, j_mask, config=config, rng=jax.random.PRNGKey(seed),
                                max_new_tokens=N, eos_id=EOS, bucket=False, **kw)
        block(out.tokens)
        return now() - t, np.asarray(out.lengths), int(out.slot_steps)

    arms = {"transformers": hf_run,
            "arca_jax one batch": functools.partial(jax_run, group_size=G),
            f"arca_jax refill {args.max_batch} slots": functools.partial(
                jax_run, group_size=G, max_batch=args.max_batch)}
    if args.shrink:
        arms[f"arca_jax shrink {args.shrink}"] = functools.partial(jax_run, group_size=G,
                                                                 shrink=args.shrink)
    devices = replicas.devices(args.replicas)
    if devices:
        arms[f"arca_jax shrink {args.shrink}, {len(devices)} dev"] = functools.partial(
            jax_run, group_size=G, shrink=args.shrink, devices=devices)
    first = {}
    for name, fn in arms.items():  # warm up (compiles)
        t = now()
        fn(0)
        first[name] = now() - t
    print("first call (compiles): " + ", ".join(f"{n} {s:.1f} s" for n, s in first.items()))
    runs = {name: [] for name in arms}
    for r in range(args.runs):  # interleaved, so all see the same machine load
        for name, fn in arms.items():
            settle()
            runs[name].append(fn(r + 1))
    result = {"machine": f"{os.cpu_count()} CPUs", "prompts": Q, "group": G, "prompt": P,
              "max_new_tokens": N, "p_eos": args.p_eos, "max_batch": args.max_batch,
              "shrink": args.shrink,
              "runs": args.runs, "load_average": os.getloadavg()[0]}
    print(f"\nmedian of {args.runs} interleaved runs; tokens = completion tokens kept (EOS "
          "included); slot use = those over the (row, column) pairs computed")
    print(f"{'':28s} {'seconds':>8s} {'tokens':>7s} {'tok/s':>8s} {'mean len':>9s} {'slot use':>9s}")
    for name, rs_ in runs.items():
        s = statistics.median(x[0] for x in rs_)
        tokens = statistics.median(int(x[1].sum()) for x in rs_)
        use = statistics.median(float(x[1].sum()) / x[2] for x in rs_)
        print(f"{name:28s} {s:8.3f} {tokens:7.0f} {tokens / s:8.0f} {tokens / B:9.1f} {use:9.2f}")
        result[name] = dict(seconds=s, tokens=tokens, tokens_per_s=tokens / s,
                            slot_use=use, raw_seconds=[x[0] for x in rs_],
                            first_call_seconds=first[name])
    base = result["transformers"]["tokens_per_s"]
    for name in list(arms)[1:]:
        print(f"{name}: {result[name]['tokens_per_s'] / base:.2f}x transformers' tokens/s")
        result[name]["speedup_tokens_per_s"] = result[name]["tokens_per_s"] / base
    return result


# --------------------------------------------------------------------------------------------
# GPU: Qwen3-1.7B shapes against the bandwidth bound
# --------------------------------------------------------------------------------------------


def random_params(config: qwen3.Qwen3Config, key, dtype):
    """Random weights straight in `dtype` (normal(0.02) kernels, unit norms), one jitted call."""
    shapes = qwen3.param_shapes(config, dtype)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(paths))
        leaves = []
        for k, (path, s) in zip(keys, paths):
            if "norm" in jax.tree_util.keystr(path):
                leaves.append(jnp.ones(s.shape, dtype))
            else:
                leaves.append((0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return make(key)


def copy_bandwidth(nbytes: int, repeats: int = 20) -> dict:
    """HBM bandwidth from a large device-to-device copy (x + 1 over `nbytes` of bfloat16: read and
    write counted) and from a read-only reduction, median of `repeats` timed calls each."""
    n = nbytes // 2
    x = block(jnp.zeros((n,), jnp.bfloat16))
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    out = {}
    for name, fn, moved in (("copy", copy, 2 * nbytes), ("read", total, nbytes)):
        block(fn(x))
        ts = []
        for _ in range(repeats):
            t = now()
            block(fn(x))
            ts.append(now() - t)
        out[name] = moved / statistics.median(ts)
    del x
    return out


# Nominal HBM bandwidth by device kind (vendors' datasheets), bytes/s.
NOMINAL_HBM = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H100": 3.35e12}

GPU_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _variant(name: str):
    """(decode_attention, cache block) of a benchmark variant: "dot" and "reduce" read the filled
    cache blocks (`qwen3.cache_attention.DECODE_BLOCK`), "dot_full" the whole cache, "pallas" each
    row's own filled slots."""
    if name == "dot_full":
        return "dot", 1 << 30
    return name, qwen3.cache_attention.DECODE_BLOCK


def _kv_read_slots(name: str, P: int, N: int, S: int) -> float:
    """Cache slots per row a decode step of variant `name` reads, averaged over the N - 1 steps
    (step i attends over P + i filled slots)."""
    filled = np.arange(1, N) + P
    if name == "dot_full":
        return float(S)
    block = qwen3.cache_attention.PALLAS_BLOCK if name == "pallas" else qwen3.cache_attention.DECODE_BLOCK
    return float(np.mean(-(-filled // block) * block))


def gpu_decode(args, params, config, dtype, B, P, N, nominal, copy_bw) -> dict:
    """Decode throughput at batch B (prompt P, N new tokens, no EOS) for each variant of
    `args.attention`, against two bounds: the nominal HBM bandwidth over the bytes a step must
    read (weights + the filled cache), and the copy bandwidth measured in this run over the bytes
    the variant reads (weights + the cache slots it touches)."""
    ids = jax.random.randint(jax.random.PRNGKey(1), (B, P), 1, config.vocab_size, jnp.int32)
    mask = jnp.ones((B, P), jnp.int32)
    settings = sampling.SamplingConfig(max_new_tokens=N)
    kv_slot = (2 * config.num_hidden_layers * B * config.num_key_value_heads * config.head_dim
               * jnp.dtype(dtype).itemsize)  # bytes of one cache position over all rows
    kv_filled = kv_slot * (P + N / 2)  # mean over the steps of the filled positions
    out = dict(batch=B, prompt=P, new_tokens=N, kv_bytes_per_step_filled=kv_filled, variants={})

    def run(attention, seed):
        t0 = now()
        w = block(sampling.prepare_weights_jit(params, config, lora=None,
                                               lora_scale=jnp.float32(1.0), merge_lora=False,
                                               decode_attention=attention))
        t1 = now()
        st = block(sampling.prefill_jit(w, ids, mask, config=config, settings=settings,
                                        rng=jax.random.PRNGKey(seed)))
        t2 = now()
        st = block(sampling.decode_jit(w, st, config=config, settings=settings))
        t3 = now()
        assert int(jnp.max(st.column)) == N
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(w)), (t1 - t0, t2 - t1, t3 - t2)

    for name in args.attention:
        if now() - T_START > args.time_budget:
            print(f"[B={B} {name}] skipped: past the time budget")
            continue
        attention, cache_block = _variant(name)
        saved = qwen3.cache_attention.DECODE_BLOCK
        qwen3.cache_attention.DECODE_BLOCK = cache_block
        jax.clear_caches()
        try:
            t = now()
            weight_bytes, _ = run(attention, 0)
            compile_s = now() - t
            times = [run(attention, r + 1)[1] for r in range(args.runs)]
        except Exception as e:  # a kernel the device refuses: record it, go on
            out["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
            print(f"[B={B} {name}] failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            qwen3.cache_attention.DECODE_BLOCK = saved
        S = qwen3.cache_size(P + N, attention)
        prep, pre, dec = (statistics.median(t[i] for t in times) for i in range(3))
        step_s = dec / (N - 1)
        must = weight_bytes + kv_filled
        read = weight_bytes + kv_slot * _kv_read_slots(name, P, N, S)
        v = dict(compile_and_first_run_s=compile_s, runs=len(times), weights_prepare_s=prep,
                 prefill_s=pre, decode_s=dec, decode_step_ms=step_s * 1e3,
                 prompt_tokens_per_s=B * P / pre, decode_tokens_per_s=B * (N - 1) / dec,
                 weight_bytes=weight_bytes, bytes_must_read=must, bytes_read=read,
                 nominal_bound_step_ms=must / nominal * 1e3,
                 fraction_of_nominal_bound=must / nominal / step_s,
                 copy_bound_step_ms=read / copy_bw * 1e3,
                 fraction_of_copy_bound=read / copy_bw / step_s,
                 effective_bytes_per_s=read / step_s)
        out["variants"][name] = v
        print(f"[B={B} {name}] compile + first run {compile_s:.1f} s; prefill {pre * 1e3:.1f} ms; "
              f"decode {step_s * 1e3:.3f} ms/step = {v['decode_tokens_per_s']:.0f} tok/s; "
              f"{v['fraction_of_nominal_bound']:.2f} of the nominal bound ({nominal / 1e12:.2f} "
              f"TB/s over weights {weight_bytes / 1e9:.2f} GB + filled cache {kv_filled / 1e9:.2f} "
              f"GB = {v['nominal_bound_step_ms']:.3f} ms); {v['fraction_of_copy_bound']:.2f} of "
              f"the copy bound ({copy_bw / 1e12:.2f} TB/s over the {read / 1e9:.2f} GB it reads)"
              f"   [{now() - T_START:.0f} s]")
    ok = {k: v for k, v in out["variants"].items() if "error" not in v}
    if ok:
        out["best"] = max(ok, key=lambda k: ok[k]["decode_tokens_per_s"])
    return out


def gpu_rollout(args, params, config, attention: str) -> dict:
    """The paper's rollout: 8 prompts x G = 4 completions, prompts of 100-400 tokens (left-padded
    to 512), up to 512 new tokens, temperature 1, top-k 50, top-p 0.95 (`sampling.generate`, each
    prompt prefilled once per group). Random weights never choose a real EOS, so the first
    `p_eos` of the vocabulary ends a completion: lengths near-geometric, mean ~1 / p_eos."""
    Q, G, P, N = 8, 4, 512, 512
    rs = np.random.default_rng(0)
    eos = tuple(range(1, 1 + max(1, round(args.paper_p_eos * config.vocab_size))))
    lengths = rs.integers(100, 401, Q)
    ids = np.zeros((Q, P), np.int32)
    mask = np.zeros((Q, P), np.int32)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = rs.integers(len(eos) + 1, config.vocab_size, n)
        mask[i, P - n:] = 1
    ids, mask = np.repeat(ids, G, 0), np.repeat(mask, G, 0)

    def run(seed):
        t = now()
        out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(seed),
                                max_new_tokens=N, temperature=1.0, top_k=50, top_p=0.95,
                                eos_id=eos, group_size=G, decode_attention=attention)
        block(out.tokens)
        return now() - t, np.asarray(out.lengths), int(out.num_steps), int(out.slot_steps)

    t = now()
    run(0)
    compile_s = now() - t
    runs = [run(r + 1) for r in range(args.runs)]
    sec = statistics.median(r[0] for r in runs)
    kept = statistics.median(int(r[1].sum()) for r in runs)
    res = dict(decode_attention=attention, prompts=Q, group=G, prompt_width=P,
               max_new_tokens=N, p_eos=args.paper_p_eos, compile_and_first_run_s=compile_s,
               seconds=sec, raw_seconds=[r[0] for r in runs], tokens_kept=kept,
               tokens_per_s=kept / sec, mean_length=kept / (Q * G),
               steps=[r[2] for r in runs], slot_use=statistics.median(
                   float(r[1].sum()) / r[3] for r in runs))
    print(f"[paper rollout, {attention}] {Q} x {G} rows, {sec:.2f} s (median of {len(runs)}), "
          f"mean length {res['mean_length']:.0f} of {N}, {res['tokens_per_s']:.0f} kept tok/s, "
          f"slot use {res['slot_use']:.2f}; compile + first run {compile_s:.1f} s")
    return res


def gpu_bench(args):
    """Qwen3-1.7B shapes (or tiny with --tiny), random bfloat16 weights: HBM bandwidth, decode
    throughput per batch size and variant (`gpu_decode`), then the paper's rollout per variant
    (`gpu_rollout`)."""
    dev = jax.devices()[0]
    if args.tiny:
        config = qwen3.Qwen3Config(**GPU_TINY)
        batches, P, N, copy_bytes = [4, 8], 8, 16, 1 << 24
    else:
        config = qwen3.preset("Qwen3-1.7B")
        batches, P, N, copy_bytes = args.gpu_batch, args.gpu_prompt, args.gpu_new_tokens, 2 << 30
    dtype = jnp.bfloat16
    bw = copy_bandwidth(copy_bytes)
    nominal = args.nominal_tbps * 1e12 if args.nominal_tbps else NOMINAL_HBM.get(dev.device_kind)
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    print(f"HBM bandwidth measured: copy {bw['copy'] / 1e12:.3f} TB/s (read + write), read-only "
          f"{bw['read'] / 1e12:.3f} TB/s; nominal "
          f"{'unknown: the copy figure stands in' if nominal is None else f'{nominal / 1e12:.2f} TB/s'}"
          f"   [{now() - T_START:.0f} s]")
    nominal = nominal or bw["copy"]
    params = block(random_params(config, jax.random.PRNGKey(0), dtype))
    res = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, tiny=args.tiny,
               model="tiny" if args.tiny else "Qwen3-1.7B shapes, random bfloat16 weights",
               hbm_nominal_bytes_per_s=nominal, hbm_copy_bytes_per_s=bw["copy"],
               hbm_read_bytes_per_s=bw["read"],
               bounds=("nominal: the nominal HBM bandwidth over the bytes a decode step must read "
                       "(weights + the filled cache, mean over the steps); copy: the copy "
                       "bandwidth measured in this run over the bytes the variant reads"),
               decode=[], rollout=[])
    for B in batches:
        res["decode"].append(gpu_decode(args, params, config, dtype, B, P, N, nominal, bw["copy"]))
        write_json(args, res)
    if not args.tiny or args.paper_rollout:
        for attention in args.rollout_attention:
            if now() - T_START > args.time_budget:
                print(f"[paper rollout, {attention}] skipped: past the time budget")
                continue
            try:
                res["rollout"].append(gpu_rollout(args, params, config, attention))
            except Exception as e:
                res["rollout"].append(dict(decode_attention=attention,
                                           error=f"{type(e).__name__}: {str(e)[:400]}"))
                print(f"[paper rollout, {attention}] failed: {type(e).__name__}: {str(e)[:200]}")
            write_json(args, res)
    print(f"total {now() - T_START:.0f} s")
    return res


def json_path(args):
    """--json, else on GPU runs $OUT/bench_sampling_gpu.json (`results_io.json_path`)."""
    return results_io.json_path(args.json, "bench_sampling_gpu.json") if args.gpu else args.json


def write_json(args, res):
    results_io.write_json(json_path(args), res)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Qwen3-1.7B shapes on the default accelerator")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny shapes, to test the code path")
    ap.add_argument("--runs", type=int, default=None, help="timed runs (default: CPU 7, GPU 3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=0, help="CPU case: both samplers' top-k (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="CPU case: both samplers' top-p")
    ap.add_argument("--groups", action="store_true",
                    help="CPU: a GRPO rollout with EOS (shared prefill, continuous refill)")
    ap.add_argument("--prompts", type=int, default=16, help="--groups: prompts")
    ap.add_argument("--group", type=int, default=8, help="--groups: completions per prompt")
    ap.add_argument("--group-new-tokens", type=int, default=128, help="--groups: at most")
    ap.add_argument("--p-eos", type=float, default=0.02,
                    help="--groups: the fraction of the vocabulary that ends a completion")
    ap.add_argument("--max-batch", type=int, default=64, help="--groups: refill slots")
    ap.add_argument("--shrink", type=int, default=3,
                    help="--groups: halvings of the slots for the one-batch arm with shrinking "
                         "(`generate(shrink=...)`; 0: no such arm)")
    ap.add_argument("--replicas", type=int, default=None,
                    help="CPU: devices sampling at once in the extra arm (default: two per core)")
    ap.add_argument("--gpu-batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--gpu-prompt", type=int, default=128)
    ap.add_argument("--gpu-new-tokens", type=int, default=512)
    ap.add_argument("--attention", nargs="+", default=["dot", "dot_full", "pallas"],
                    choices=["reduce", "dot", "dot_full", "pallas"],
                    help="GPU: decode_attention variants to time, in order (see qwen3.InferenceWeights)")
    ap.add_argument("--rollout-attention", nargs="+", default=["dot", "pallas"],
                    choices=["reduce", "dot", "pallas"], help="GPU: variants of the paper rollout")
    ap.add_argument("--paper-rollout", action="store_true", help="with --tiny: run it too")
    ap.add_argument("--paper-p-eos", type=float, default=0.003,
                    help="GPU paper rollout: fraction of the vocabulary that ends a completion")
    ap.add_argument("--nominal-tbps", type=float, default=None,
                    help="GPU: nominal HBM TB/s (default: from the device kind)")
    ap.add_argument("--time-budget", type=float, default=200.0,
                    help="GPU: seconds after which no further timed run starts")
    ap.add_argument("--json", default=None,
                    help="write the results here (GPU default: $OUT/bench_sampling_gpu.json)")
    args = ap.parse_args()
    if not args.gpu:
        replicas.use_cpu_cores()  # before JAX starts, as the trainer's commands
    if args.runs is None:
        args.runs = 3 if args.gpu else 7
    res = gpu_bench(args) if args.gpu else groups_bench(args) if args.groups else cpu_bench(args)
    path = json_path(args)
    if path:
        write_json(args, res)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
