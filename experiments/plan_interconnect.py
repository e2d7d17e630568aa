"""The interconnect estimate (`arca_jax.plan.interconnect_seconds`) of committed
`arca-jax plan --json` results, without recompiling: each program's collectives (bytes moved per
device, loop-scaled) over its chip's published inter-chip bandwidth (`plan.CHIPS`), next to the
roofline seconds the JSON holds. One markdown row per plan:

    python experiments/plan_interconnect.py experiments/results/plan/*.json
"""

from __future__ import annotations

import json
import sys

from arca_jax import plan

ROLLOUT = ("prepare_weights", "prefill", "decode")


def _chip(name: str) -> plan.Chip:
    return next(c for c in plan.CHIPS.values() if c.name == name)


def row(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    p = data.get("plan", data)
    t = p["target"]
    link = _chip(t["chip"]).link_bandwidth
    link = None if link is None else link * t["chips"] / t["devices"]

    def seconds(names, key):
        runs = [(r[key], r["runs_per_step"]) for r in p["programs"] if r["name"] in names]
        if not runs or any(v is None for v, _ in runs):
            return None
        return sum(v * n for v, n in runs)

    def links(names):
        if link is None:
            return None
        return sum(plan.interconnect_seconds(r["collectives"], link) * r["runs_per_step"]
                   for r in p["programs"] if r["name"] in names)

    def fmt(s):
        return "-" if s is None else f"{s:.2f}"

    m = p["mesh"]
    sampler = p.get("sampler", {}).get("mesh", m)
    mesh = f"{m['data']}, {m['fsdp']}, {m['tensor']}"
    if sampler != m:
        mesh += f" (rollouts {sampler['data']}, {sampler['fsdp']}, {sampler['tensor']})"
    return (f"| {path.rsplit('/', 1)[-1]} | {t['name']} | {mesh} | "
            f"{fmt(seconds(('train_step',), 'roofline_s'))} | {fmt(links(('train_step',)))} | "
            f"{fmt(seconds(ROLLOUT, 'roofline_s'))} | {fmt(links(ROLLOUT))} |")


def main(paths) -> None:
    print("| plan | target | mesh (data, fsdp, tensor) | update roofline (s) | update "
          "interconnect (s) | rollout roofline (s) | rollout interconnect (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for path in paths:
        if path.endswith(".json"):
            print(row(path))


if __name__ == "__main__":
    main(sys.argv[1:])
