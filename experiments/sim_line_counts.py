"""The packed step's line-count rule (`arca_jax.trainer.programs`) against rounding each batch's
need up to quarters of the batch (the rule before), simulated: programs compiled per run and mean
lines per step, for needs drawn around the demo benchmark's (128 rows; first-fit needs of mean 94
lines, sd 6, as `experiments/bench_vs_trl.py`'s rollouts give in lines of T = 112 slots).

    python experiments/sim_line_counts.py [--mean 94 --sd 6 --trials 500]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from arca_jax.trainer.programs import StepPrograms  # noqa: E402


def run(choose, needs):
    """(programs, mean lines) of one run whose batches need `needs` lines."""
    known, lines = set(), []
    for n in needs:
        c = choose(int(n), known)
        known.add(c)
        lines.append(c)
    return len(known), float(np.mean(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--mean", type=float, default=94.0)
    ap.add_argument("--sd", type=float, default=6.0)
    ap.add_argument("--trials", type=int, default=500)
    args = ap.parse_args()
    B = args.rows

    def quarters(n, known):
        q = max(1, B // 4)
        return -(-n // q) * q

    def rule(n, known):
        return StepPrograms(None, rows=B, known=known).lines_for(n)

    rng = np.random.default_rng(0)
    for steps in (20, 300):
        got = {"quarters": [], "trainer.programs": []}
        for _ in range(args.trials):
            needs = np.clip(rng.normal(args.mean, args.sd, steps).round(), 1, B).astype(int)
            got["quarters"].append(run(quarters, needs))
            got["trainer.programs"].append(run(rule, needs))
        for name, rows in got.items():
            progs, lines = np.mean(rows, axis=0)
            print(f"{steps:4d} steps  {name:17s} programs {progs:.2f}  mean lines {lines:.1f}  "
                  f"(mean need {args.mean:.0f})")


if __name__ == "__main__":
    main()
