"""Line-count rules for the packed step, simulated: programs compiled per run and mean lines per
step, for needs drawn around the demo benchmark's (128 rows; first-fit needs of mean 94 lines, sd 6,
as `experiments/bench_vs_trl.py`'s rollouts give in lines of T = 112 slots). "quarters" is the
trainer's (`arca_jax.trainer.programs`: the need rounded up to a multiple of B / 4); "reuse" was
tried: a count the run has met while it pads < B / 4, else the need rounded up to B / 16 plus
B / 16. Within one run "reuse" meets fewer programs; across runs it meets other counts than the
run that filled the compilation cache, which the benchmark showed (experiments/NOTES_vs_trl.md).

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
        return StepPrograms(None, rows=B).lines_for(n)

    def reuse(n, known):
        fits = [c for c in known if n <= c < n + max(1, B // 4)]
        if fits:
            return min(fits)
        g = max(1, B // 16)
        return min(-(-n // g) * g + g, B)

    rng = np.random.default_rng(0)
    for steps in (20, 300):
        got = {"quarters": [], "reuse": []}
        for _ in range(args.trials):
            needs = np.clip(rng.normal(args.mean, args.sd, steps).round(), 1, B).astype(int)
            got["quarters"].append(run(quarters, needs))
            got["reuse"].append(run(reuse, needs))
        for name, rows in got.items():
            progs, lines = np.mean(rows, axis=0)
            print(f"{steps:4d} steps  {name:9s} programs {progs:.2f}  mean lines {lines:.1f}  "
                  f"(mean need {args.mean:.0f})")


if __name__ == "__main__":
    main()
