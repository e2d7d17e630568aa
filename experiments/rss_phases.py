"""Resident memory of one `arca-jax train` run over time, labelled by what the process was doing
(XLA compiles, stored-program writes, calls of the trainer's stored programs): where a run's peak
RSS comes from (experiments/NOTES_vs_trl.md, "Head-major attention, compiler memory handed
back"). Not a test. The run is bench_vs_trl.py's arca-jax arm (its settings, seed 0), in this
process, for a few steps; use a fresh XDG_CACHE_HOME to see a compiling run.

    XDG_CACHE_HOME=$(mktemp -d) python experiments/rss_phases.py RUN_DIR [--steps 2]
        [--weighting arca] [--set KEY=VALUE ...]

Prints ru_maxrss and, per contiguous phase, its start (s), its peak RSS (GB) and its label.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_vs_trl  # noqa: E402  (settings only; imports no jax at module level)

_label = ["start"]
_phases = []  # [label, peak GB, start time]


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _poll() -> None:
    while True:
        r, label = _rss_gb(), _label[0]
        if not _phases or _phases[-1][0] != label:
            _phases.append([label, 0.0, time.time()])
        _phases[-1][1] = max(_phases[-1][1], r)
        time.sleep(0.003)


def _instrument() -> None:
    import jax._src.stages as stages

    from arca_jax.trainer import executables

    compile_, count = stages.Lowered.compile, [0]

    def compile(self, *a, **k):
        count[0] += 1
        _label[0] = f"compile #{count[0]} (RSS before {_rss_gb():.3f} GB)"
        try:
            return compile_(self, *a, **k)
        finally:
            _label[0] = f"after compile #{count[0]}"

    stages.Lowered.compile = compile
    write = executables.ExecutableStore._write

    def write_(self, path, program):
        _label[0] = "store write " + os.path.basename(path).split("-")[0]
        try:
            return write(self, path, program)
        finally:
            _label[0] = "after store write"

    executables.ExecutableStore._write = write_
    compiled = executables.ExecutableStore.compiled

    def compiled_(self, name, *a, **k):
        program = compiled(self, name, *a, **k)

        def call(*x, **y):
            _label[0] = "call " + name
            try:
                return program(*x, **y)
            finally:
                _label[0] = "after call " + name
        return call

    executables.ExecutableStore.compiled = compiled_


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--weighting", default="arca")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    threading.Thread(target=_poll, daemon=True).start()
    _instrument()
    s = dataclasses.replace(bench_vs_trl.BenchSettings(), steps=args.steps)
    argv = ["train", "--output-dir", args.run_dir]
    for o in bench_vs_trl.arca_overrides(s, args.weighting, 0) + args.overrides:
        argv += ["--set", o]
    from arca_jax import cli
    try:
        return cli.main(argv) or 0
    finally:
        print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3f} GB")
        t0 = _phases[0][2] if _phases else time.time()
        for label, peak, t in _phases:
            print(f"{t - t0:7.2f} s  {peak:.3f} GB  {label}")


if __name__ == "__main__":
    sys.exit(main())
