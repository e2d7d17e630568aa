"""Soak run of the embedded demo (issue 17): host memory and the number of compiled programs per
step, which should stay flat after the first steps. A benchmark script, not a test.

    python experiments/soak.py --steps 300 --out /tmp/soak        # writes soak.csv + summary
    python experiments/soak.py --steps 300 --fixed-width --malloc-trim --out /tmp/soak_trim

Each training step logs its row through a `RunLog` subclass that also records the process's
resident memory (/proc/self/statm) and the number of XLA compilations so far (JAX's
'/jax/core/compile/backend_compile_duration' monitoring event). `--fixed-width` cuts every prompt
to the shortest prompt length (15 characters), so every batch has one shape; without it the
prompt width varies with the step's problems and a few widths compile once each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import tracemalloc

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from arca_jax import config, train  # noqa: E402
from arca_jax.runlog import RunLog  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = 0


def _on_duration(event: str, duration: float, **_) -> None:
    global _compiles
    if event == COMPILE_EVENT:
        _compiles += 1


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class SoakLog(RunLog):
    def __init__(self, run_dir, rows):
        super().__init__(run_dir, tensorboard=False)
        self.rows = rows

    def metrics(self, record):
        super().metrics(record)
        if TRIM:  # hand the allocator's free pages back before reading the resident size
            TRIM[0](0)
        self.rows.append({"step": record["step"], "rss_mib": round(rss_mib(), 1),
                          "compiles": _compiles, "step_time_s": round(record["step_time_s"], 3),
                          "wall_s": round(time.time() - T0, 1)})
        if TRACE.get("from_step") == record["step"]:
            TRACE["first"] = tracemalloc.take_snapshot()
        if TRACE.get("to_step") == record["step"]:
            TRACE["last"] = tracemalloc.take_snapshot()


TRACE = {}  # --tracemalloc: Python-heap snapshots at two steps
TRIM = []  # --malloc-trim: glibc's malloc_trim


def python_heap_growth(first, last, top: int = 20) -> list:
    """The Python allocation sites whose live bytes grew most between two snapshots."""
    stats = last.compare_to(first, "lineno")
    return [{"site": str(s.traceback[0]), "grew_kib": round(s.size_diff / 1024, 1),
             "live_kib": round(s.size / 1024, 1), "blocks_grew": s.count_diff}
            for s in stats[:top]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", required=True, help="directory for the run, soak.csv, soak.json")
    p.add_argument("--fixed-width", action="store_true", help="one prompt width for every step")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tracemalloc", type=int, nargs=2, metavar=("FROM", "TO"), default=None,
                   help="trace Python allocations and report the sites whose live bytes grew "
                        "between steps FROM and TO (Python's heap only, not XLA's buffers)")
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc's malloc_trim(0) after every step, before reading the "
                        "resident size: memory the allocator merely keeps is released, so what "
                        "still grows is live (a leak), not allocator retention")
    args = p.parse_args(argv)
    if args.malloc_trim:
        import ctypes

        TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
    if args.tracemalloc:
        tracemalloc.start(1)
        TRACE.update(from_step=args.tracemalloc[0], to_step=args.tracemalloc[1])
    overrides = [f"train.steps={args.steps}", "rollout.prompts_per_step=2",
                 "rollout.group_size=4", "rollout.max_new_tokens=48", "train.save_every=50",
                 "train.samples_every=25", "train.samples_per_log=1", "train.eval_every=0",
                 "task.num_eval_problems=4"]
    if args.fixed_width:
        overrides.append("rollout.max_prompt_tokens=15")
    cfg = config.load(None, overrides + args.overrides)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    run_dir = os.path.join(args.out, "run")
    train.train(cfg, run_dir, resume=os.path.isdir(run_dir), log=SoakLog(run_dir, rows))
    with open(os.path.join(args.out, "soak.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tail = rows[len(rows) // 2:] or rows
    summary = {"steps": len(rows), "rss_mib_first": rows[0]["rss_mib"],
               "rss_mib_at_half": tail[0]["rss_mib"], "rss_mib_last": rows[-1]["rss_mib"],
               "compiles_after_step_1": rows[0]["compiles"],
               "compiles_at_half": tail[0]["compiles"], "compiles_last": rows[-1]["compiles"]}
    if "first" in TRACE and "last" in TRACE:
        steps = TRACE["to_step"] - TRACE["from_step"]
        growth = python_heap_growth(TRACE["first"], TRACE["last"])
        total = sum(s.size_diff for s in TRACE["last"].compare_to(TRACE["first"], "filename"))
        summary["python_heap"] = {"from_step": TRACE["from_step"], "to_step": TRACE["to_step"],
                                  "grew_kib_total": round(total / 1024, 1),
                                  "grew_kib_per_step": round(total / 1024 / max(steps, 1), 2),
                                  "top_sites": growth}
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


T0 = time.time()

if __name__ == "__main__":
    sys.exit(main())
