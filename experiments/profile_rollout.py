"""Where the embedded demo's rollout time goes on CPU: `generate_rows` timed on the demo config,
optionally with jax's profiler (XLA operations by total time). Not a test: times only.

    python experiments/profile_rollout.py [--trace] [--decode-block N] [--replicas 1,2]
                                          [--set KEY=VALUE ...]

--replicas: sampler replica counts (`rollout.replicas`, `arca_jax.replicas`) timed in turn, each
round calling every count once (default: the config's). JAX gets two CPU devices per core, as
`arca-jax train` gives it.

--decode-block: `qwen3.cache_attention.DECODE_BLOCK` (above the cache size: no filled-block
switch). XLA flags (e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...) from the
environment. Three warm-up rollouts, then the median of six (the adapter's B random, scale 0.02).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax import config, host_memory, replicas  # noqa: E402
from arca_jax.prompts import bucket_prompts  # noqa: E402
from arca_jax.qwen3 import cache_attention  # noqa: E402
from arca_jax.trainer import setup  # noqa: E402
from arca_jax.trainer.rollout import encode_prompts, generate_rows, step_prompt_indices  # noqa: E402
from profile_update import demo_adapter  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--decode-block", type=int, default=None)
    ap.add_argument("--merge", action="store_true", help="sample from W + s A B (merge_lora)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--replicas", default=None,
                    help="comma-separated rollout.replicas values timed in turn")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (the trainer's commands set it to reuse "
                         "freed memory on CPU: arca_jax.host_memory)")
    args = ap.parse_args()
    if not args.malloc_default:
        host_memory.reuse_freed_memory()  # as `arca-jax train` does, before JAX starts
    replicas.use_cpu_cores()  # likewise
    if args.decode_block:
        cache_attention.DECODE_BLOCK = args.decode_block
    cfg = config.load(None, args.overrides)
    mesh = setup.make_run_mesh(cfg)
    model = setup.load_model(cfg, mesh)
    task = setup.load_train_task(cfg)
    key = jax.random.PRNGKey(0)
    _, tree = demo_adapter(model.config, key, 0.02, setup.lora_config(cfg, model.config))
    r = cfg.rollout

    counts = ([None] if args.replicas is None
              else [int(c) for c in args.replicas.split(",")])

    def one(step, count=counts[0]):
        idx = step_prompt_indices(cfg.train.seed, step, len(task.problems), r.prompts_per_step)
        prompts = [task.problems[i].prompt for i in idx]
        ids, mask = bucket_prompts(*encode_prompts(model.tokenizer, prompts, r.max_prompt_tokens,
                                                   model.pad_id, r.prompt_truncation),
                                   max_tokens=r.max_prompt_tokens, pad_id=model.pad_id)
        t0 = time.perf_counter()
        gen = generate_rows(model, mesh, ids, mask, group_size=r.group_size,
                            rng=jax.random.fold_in(key, step), max_batch=r.max_batch,
                            shrink=r.shrink, replicas=r.replicas if count is None else count,
                            max_new_tokens=r.max_new_tokens, lora=tree,
                            lora_scale=cfg.lora.scaling, temperature=r.temperature,
                            top_p=r.top_p, top_k=r.top_k, min_p=r.min_p, merge_lora=args.merge)
        jax.block_until_ready(gen.out.tokens)
        lengths = np.asarray(gen.out.mask).sum(axis=1)
        return time.perf_counter() - t0, int(lengths.max()), float(lengths.mean())

    for s in range(3):
        for c in counts:
            one(s, c)
    runs = {c: [] for c in counts}
    for s in range(3, 9):
        for c in counts:
            runs[c].append(one(s, c))
    for c, rs in runs.items():
        name = "" if c is None else f"replicas {c}: "
        for t, longest, mean in rs:
            print(f"{name}generate {t:.3f} s  longest {longest}  mean {mean:.1f} tokens")
    print(f"load average {os.getloadavg()[0]:.2f}")
    for c, rs in runs.items():
        name = "" if c is None else f"replicas {c}: "
        print(f"{name}median generate {np.median([t for t, _, _ in rs]):.3f} s")
    if not args.trace:
        return
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for s in range(9, 12):
            one(s)
    path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
    total, count = collections.Counter(), collections.Counter()
    for e in json.load(gzip.open(path))["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e:
            name = e["name"] if os.environ.get("EXACT") else re.sub(r"\.\d+$", "", e["name"])
            total[name] += e["dur"]
            count[name] += 1
    for name, us in total.most_common(30):
        print(f"{us / 3e3:9.1f} ms/rollout  x{count[name] // 3:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
