"""Recomputes the work figures of `arca-jax plan --json` output from the HLO it wrote with
--hlo-dir, with the current `arca_jax.plan.hlostats` (no recompiling: compiling the big models
for a TPU slice takes tens of minutes on a small machine). Memory figures are XLA's and stay as
they are; flops, bytes, collectives, roofline seconds, MFU and the per-step totals are
rewritten.

    python experiments/plan_reanalyze.py PLAN.json HLO_DIR [OUT.json]
"""

from __future__ import annotations

import glob
import json
import os
import sys

from arca_jax.plan import hlostats


def _hlo_file(hlo_dir: str, plan: dict, name: str) -> str:
    m = plan["mesh"]
    layout = f"{m['data']}-{m['fsdp']}-{m['tensor']}"
    sampler = plan.get("sampler", {}).get("mesh", m)
    rollout = ("" if sampler == m else
               f"rollout-{sampler['data']}-{sampler['fsdp']}-{sampler['tensor']}_")
    exact = os.path.join(hlo_dir, f"{layout}_remat-{plan['remat']}_mb-{plan['microbatches']}_"
                                  f"{rollout if name != 'train_step' else ''}{name}.hlo")
    if os.path.isfile(exact):
        return exact
    # a sampler program reused from the first setting of the same mesh
    found = sorted(glob.glob(os.path.join(hlo_dir, f"{layout}_*_{name}.hlo")))
    if not found:
        raise FileNotFoundError(f"no HLO of {name} for mesh {layout} in {hlo_dir}")
    return found[0]


def reanalyze_plan(plan: dict, hlo_dir: str) -> None:
    t = plan["target"]
    peak, bandwidth = t["peak_flops_per_device"], t["hbm_bandwidth_per_device"]
    for r in plan["programs"]:
        with open(_hlo_file(hlo_dir, plan, r["name"])) as f:
            work = hlostats.analyze(f.read(), r["unknown_trip_count"])
        r.update(flops=work.flops, bytes=work.bytes, loops=list(work.loops),
                 collectives={k: {"ops": c.ops, "runs": c.runs, "bytes": c.bytes}
                              for k, c in work.collectives.items()})
        if peak and bandwidth:
            t_flops, t_bytes = work.flops / peak, work.bytes / bandwidth
            r["roofline_s"] = max(t_flops, t_bytes)
            r["bound"] = "compute" if t_flops >= t_bytes else "memory"
            r["mfu"] = t_flops / r["roofline_s"] if r["roofline_s"] > 0 else None

    def total(names):
        rs = [r for r in plan["programs"] if r["name"] in names]
        if not rs or any(r["roofline_s"] is None for r in rs):
            return None
        return sum(r["roofline_s"] * r["runs_per_step"] for r in rs)

    plan["update_s"] = total(("train_step",))
    plan["rollout_s"] = total(("prepare_weights", "prefill", "decode"))
    plan["step_s"] = (None if plan["update_s"] is None or plan["rollout_s"] is None
                      else plan["update_s"] + plan["rollout_s"])
    evals = [r["roofline_s"] for r in plan["programs"] if r["name"].startswith("eval_")]
    plan["eval_chunk_s"] = sum(evals) if evals and None not in evals else None


def main(argv) -> int:
    path, hlo_dir = argv[0], argv[1]
    out = argv[2] if len(argv) > 2 else path
    with open(path) as f:
        verdict = json.load(f)
    for key in ("plan", "suggestion"):
        if verdict.get(key):
            reanalyze_plan(verdict[key], hlo_dir)
    with open(out, "w") as f:
        json.dump(verdict, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
