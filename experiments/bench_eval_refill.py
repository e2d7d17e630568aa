"""Evaluation wall time with and without continuous refill (not a test).

The demo's evaluation on the embedded tiny model (`arca-jax train` defaults: the arithmetic
task's 200 held-out problems, greedy accuracy and pass@k with k = 4 samples each at
temperature 1, up to 80 new tokens), base model, four ways, interleaved runs, medians:

  one batch      all problems' rows in one generation (`train.eval_batch_size` >= 200, the
                 default 256): every row waits for the longest one
  chunks of C    C problems' rows per generation, one generation after another, each as long as
                 its longest row (how evaluation ran before refill, with eval_batch_size = C)
  refill C       one generation with C problems' rows decoding at once, a finished row handing
                 its slot to the next waiting one (evaluation now, eval_batch_size = C)

    python experiments/bench_eval_refill.py [--runs 3] [--chunk 32 64] [--json PATH]

Prints seconds per evaluation (greedy pass + sampled pass) and checks that refill and one
batch score the problems identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from arca_jax import config as config_lib, trainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cfg = config_lib.load(None, ["train.pass_k=4"])
    model = trainer.load_model(cfg)
    task, problems = trainer.load_eval_task(cfg)
    score = trainer.Scorer(task, cfg.task.reward_timeout_s)
    key = jax.random.PRNGKey(0)
    k = cfg.train.pass_k or cfg.rollout.group_size
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.2f}; {len(problems)} problems x k = {k}, up to "
          f"{cfg.rollout.max_new_tokens} new tokens")

    def with_batch(n):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batch_size=n))

    def one_batch():
        return trainer.evaluate(model, None, 1.0, problems, score, with_batch(len(problems)),
                                0, key)

    def chunks(c):
        def run():
            parts = [trainer.evaluate(model, None, 1.0, problems[i:i + c], score, with_batch(c),
                                      0, jax.random.fold_in(key, i))
                     for i in range(0, len(problems), c)]
            return parts
        return run

    def refill(c):
        return lambda: trainer.evaluate(model, None, 1.0, problems, score, with_batch(c), 0, key)

    arms = {"one batch": one_batch}
    for c in args.chunk:
        arms[f"chunks of {c}"] = chunks(c)
        arms[f"refill {c}"] = refill(c)
    results = {}
    t = time.perf_counter()
    for name, fn in arms.items():  # compile
        results[name] = fn()
    print(f"warm-up (compiles) {time.perf_counter() - t:.1f} s")
    base = results["one batch"]
    for c in args.chunk:  # refill scores every problem as the one batch did (same key)
        r = results[f"refill {c}"]
        assert r.greedy == base.greedy and r.correct_of_k == base.correct_of_k, c
    times = {name: [] for name in arms}
    for _ in range(args.runs):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {"machine": f"{os.cpu_count()} CPUs", "problems": len(problems), "k": k,
           "max_new_tokens": cfg.rollout.max_new_tokens, "runs": args.runs,
           "greedy_accuracy": base.greedy_accuracy, "pass_at_k": base.pass_at_k,
           "load_average": os.getloadavg()[0]}
    print(f"\nmedian of {args.runs} interleaved runs (greedy + sampled passes), base model: "
          f"greedy {base.greedy_accuracy:.3f}, pass@{k} {base.pass_at_k:.3f}")
    for name, ts in times.items():
        m = statistics.median(ts)
        out[name] = dict(seconds=m, raw=ts)
        print(f"{name:14s} {m:7.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
