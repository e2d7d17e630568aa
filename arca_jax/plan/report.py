"""A verdict as JSON (`to_json`) and as a table (`format_text`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional

from arca_jax.plan.errors import Refusal
from arca_jax.plan.figures import Plan, ProgramReport
from arca_jax.plan.search import Verdict
from arca_jax.plan.targets import GiB


def _gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GiB, 3)


def plan_json(p: Plan) -> dict:
    """One plan as JSON-ready values (bytes, seconds, FLOP counts per device)."""
    t = p.target
    return {
        "model": p.model,
        "target": {"name": t.name, "platform": t.platform, "chip": t.chip.name, "chips": t.chips,
                   "devices": t.size, "hbm_bytes_per_device": t.hbm_bytes,
                   "peak_flops_per_device": t.peak_flops,
                   "hbm_bandwidth_per_device": t.hbm_bandwidth,
                   "link_bandwidth_per_device": t.link_bandwidth, "chip_source": t.chip.source},
        "mesh": dataclasses.asdict(p.knobs.layout),
        "remat": p.knobs.remat,
        "microbatches": p.knobs.microbatches,
        "trainer_overrides": p.knobs.overrides(),
        "global_batch": {"rows": p.shapes.rows, "tokens_per_row": p.shapes.tokens,
                         "tokens": p.shapes.rows * p.shapes.tokens},
        "sampler": {"rows": p.shapes.sampler_rows, "prompt_width": p.shapes.sampler_prompt,
                    "new_tokens_width": p.shapes.sampler_new_tokens,
                    "decode_steps": p.shapes.new_tokens - 1,
                    "eval_rows": p.shapes.eval_rows,
                    "mesh": dataclasses.asdict(p.sampler_layout or p.knobs.layout),
                    "weights_gathered_over_fsdp": p.sampler_gathered,
                    "decode_all_gather_bytes_per_step": p.decode_gathered_per_step},
        "fits": p.fits,
        "refused": _refusal_json(p.refused),
        "problems": list(p.problems),
        "peak_bytes_per_device": p.peak_bytes,
        "peak_gib_per_device": _gib(p.peak_bytes),
        "update_s": p.update_s,
        "rollout_s": p.rollout_s,
        "step_s": None if p.update_s is None or p.rollout_s is None else p.update_s + p.rollout_s,
        "eval_chunk_s": p.eval_chunk_s,
        "update_interconnect_s": p.update_interconnect_s,
        "rollout_interconnect_s": p.rollout_interconnect_s,
        "train_state": _state_json(p),
        "programs": [dict(_program_json(r), fits=p.program_fits(r)) for r in p.programs],
    }


def _refusal_json(r: Optional[Refusal]) -> Optional[dict]:
    """A refusal for lack of device memory: the program, the compiler's line and its figures."""
    if r is None:
        return None
    return {"program": r.program, "message": r.message, "used_bytes": r.used_bytes,
            "available_bytes": r.available_bytes, "used_gib": _gib(r.used_bytes),
            "available_gib": _gib(r.available_bytes)}


def _state_json(p: Plan) -> Optional[dict]:
    """The train state's bytes per device (split over fsdp as the trainer lays it out), the same
    replicated over fsdp, the saving, and the state's share of the plan's peak."""
    s, r = p.state, p.replicated_state
    if s is None or r is None:
        return None
    return {"adapter_bytes": s.adapter, "optimizer_bytes": s.optimizer,
            "gradient_bytes": s.gradient, "other_bytes": s.other, "total_bytes": s.total,
            "replicated_total_bytes": r.total, "saving_bytes": r.total - s.total,
            "share_of_peak": p.state_share}


def _program_json(r: ProgramReport) -> dict:
    m = r.memory
    return {
        "name": r.name, "runs_per_step": r.runs_per_step,
        "memory_bytes": {"argument": m.argument, "output": m.output, "temp": m.temp,
                         "alias": m.alias, "code": m.code, "total": m.total,
                         "resident": m.resident, "peak": m.peak},
        "xla_cost_analysis": {"flops": r.xla_flops, "bytes_accessed": r.xla_bytes,
                              "note": "each while-loop / scan body counted once"},
        "flops": r.flops, "bytes": r.bytes,
        "loops": list(r.loops), "unknown_trip_count": r.unknown_trip_count,
        "collectives": {k: dataclasses.asdict(v) for k, v in r.collectives.items()},
        "roofline_s": r.roofline_s, "bound": r.bound, "mfu": r.mfu,
        "interconnect_s": r.interconnect_s,
        "compile_s": round(r.compile_s, 2),
    }


def to_json(v: Verdict) -> dict:
    """The verdict as JSON-ready values: the plan, the suggestion and every setting tried
    ("refused": the compiler's RESOURCE_EXHAUSTED line when it refused one of its programs)."""
    return {
        "plan": plan_json(v.plan),
        "suggestion": None if v.suggestion is None else plan_json(v.suggestion),
        "faster": None if v.faster is None else plan_json(v.faster),
        "tried": [{"mesh": dataclasses.asdict(k.layout), "remat": k.remat,
                   "microbatches": k.microbatches, "rollout_tensor": k.rollout_tensor,
                   "peak_gib_per_device": _gib(peak),
                   "refused": None if r is None else r.message,
                   "refused_program": None if r is None else r.program,
                   "rollout_with_interconnect_s": s}
                  for k, peak, r, s in itertools.zip_longest(v.tried, v.peaks, v.refusals,
                                                             v.rollouts)],
        "notes": NOTES,
    }


NOTES = ("Per device. XLA's cost analysis counts each while-loop or scan body once; flops, bytes "
         "and collectives here multiply every loop body by its trip count (decoder layers, "
         "microbatches, and the decode loop's max_new_tokens - 1 steps, its worst case). Roofline "
         "seconds = max(flops / peak, bytes / HBM bandwidth); interconnect time is not included. "
         "Interconnect seconds (apart): the collectives' traffic (4 x an all-reduce's bytes, 2 x "
         "any other's: ring algorithms over large groups) over the chip's published inter-chip "
         "bandwidth, both directions together; latency, topology and overlap left out.")


def _fmt_bytes(n: Optional[float]) -> str:
    """GiB with three significant digits."""
    return "-" if n is None else f"{n / GiB:.3g}"


def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _yes_no(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_plan(p: Plan) -> str:
    """One plan as a table: a row per program, memory in GiB per device."""
    t = p.target
    lines = [f"{p.model} on {t.name}, {t.chip.name}: mesh {p.knobs.layout}, remat "
             f"{p.knobs.remat}, microbatches {p.knobs.microbatches}",
             f"  batch {p.shapes.rows} rows x {p.shapes.tokens} tokens; sampler "
             f"{p.shapes.sampler_rows} rows, prompt {p.shapes.sampler_prompt}, "
             f"{p.shapes.sampler_new_tokens} new tokens"
             + (f", on the mesh {p.sampler_layout} (rollout.mesh_fsdp / mesh_tensor)"
                if p.sampler_layout else "")
             + (", weights gathered over fsdp (rollout.gather_weights)" if p.sampler_gathered
                else ""),
             f"  HBM per device: {_fmt_bytes(t.hbm_bytes)} GiB"
             + ("" if t.peak_flops else f" ({t.chip.source})"),
             "  program          args  out  temp alias  total  peak GiB  fits   TFLOP   GB"
             "     roofline  bound    MFU  collectives (runs)"]
    for r in p.programs:
        m = r.memory
        coll = ", ".join(f"{k} {c.runs:g}" for k, c in r.collectives.items() if c.runs)
        lines.append(
            f"  {r.name:<15} {_fmt_bytes(m.argument):>5} {_fmt_bytes(m.output):>4} "
            f"{_fmt_bytes(m.temp):>5} {_fmt_bytes(m.alias):>5} {_fmt_bytes(m.total):>6} "
            f"{_fmt_bytes(m.peak):>9}  {_yes_no(p.program_fits(r)):>4}"
            f" {r.flops / 1e12:7.3f} {r.bytes / 1e9:6.2f} {_fmt_s(r.roofline_s):>10}  "
            f"{r.bound or '-':<7} {'-' if r.mfu is None else f'{r.mfu:.2f}':>4}  {coll or '-'}")
    links = ("" if p.update_interconnect_s is None else
             f"; interconnect, apart: update {_fmt_s(p.update_interconnect_s)}, rollout "
             f"{_fmt_s(p.rollout_interconnect_s)}")
    lines.append(f"  per step: update {_fmt_s(p.update_s)}, rollout {_fmt_s(p.rollout_s)} "
                 "(roofline)" + links
                 + (f"; an evaluation chunk of {p.shapes.eval_rows} rows "
                    f"{_fmt_s(p.eval_chunk_s)}" if p.shapes.eval_rows else ""))
    if p.state is not None and p.replicated_state is not None:
        s = p.state
        share = "" if p.state_share is None else f", {p.state_share:.1%} of the peak"
        lines.append(f"  train state per device: {_fmt_bytes(s.total)} GiB (adapter "
                     f"{_fmt_bytes(s.adapter)}, Adam {_fmt_bytes(s.optimizer)}, gradient "
                     f"{_fmt_bytes(s.gradient)}){share}; replicated "
                     f"over fsdp it would be {_fmt_bytes(p.replicated_state.total)} GiB")
    if p.decode_gathers_weights:
        lines.append(f"  the decode loop all-gathers {p.decode_gathered_per_step / 1e9:.2f} GB per "
                     "device and step over the interconnect (not in the roofline): a tensor "
                     "axis for the sampler (rollout.mesh_tensor, or --mesh DATA,FSDP,TENSOR for "
                     "both), or rollout.gather_weights=true where the weights fit, keeps the "
                     "kernels in place")
    if p.refused is not None:
        lines.append("  " + _refusal_text(p.refused))
    for problem in p.problems:
        lines.append(f"  the trainer refuses this: {problem}")
    return "\n".join(lines)


def _refusal_text(r: Refusal) -> str:
    """One line: the program the compiler refused for lack of memory, its figures and line."""
    figure = ("" if r.used_bytes is None else f", {_fmt_bytes(r.used_bytes)} GiB of "
              f"{_fmt_bytes(r.available_bytes)} GiB per device")
    return f"REFUSED by the compiler for lack of memory: {r.program}{figure} ({r.message})"


def _tried_lines(v: Verdict) -> List[str]:
    """A line per setting tried: its knobs and peak (and rollout seconds, when known), or the
    compiler's refusal."""
    return [f"  mesh {k.layout}, remat {k.remat}, microbatches {k.microbatches}"
            + ("" if k.rollout_tensor is None else f", rollout tensor {k.rollout_tensor}")
            + f": peak {_fmt_bytes(peak)} GiB"
            + ("" if s is None else f", rollout {_fmt_s(s)} with the interconnect estimate")
            + ("" if r is None else "; " + _refusal_text(r))
            for k, peak, r, s in itertools.zip_longest(v.tried, v.peaks, v.refusals, v.rollouts)]


def format_text(v: Verdict) -> str:
    """The verdict as text: the plan's table, the verdict, the change that fits or those tried."""
    out = [format_plan(v.plan)]
    fits = v.plan.fits
    if fits:
        out.append("verdict: fits")
        if v.faster is not None:
            out.append("rollout layouts tried (interconnect latency not counted: a large "
                       "tensor group pays it at each of its many small all-reduces):")
            out += _tried_lines(v)
            out.append("faster rollouts, the weights in place (the train step unchanged; the "
                       "shortest rollout roofline + interconnect estimate of the rollout-only "
                       "tensor axes tried):")
            out.append(format_plan(v.faster))
            out.append("  train with: " + " ".join(f"--set {o}" for o in v.faster.knobs.overrides()))
    elif fits is None:
        out.append("verdict: unknown (no memory figure for this device; pass --hbm GIB)")
    elif v.suggestion is not None:
        if any(r is not None for r in v.refusals):
            out.append("settings tried:")
            out += _tried_lines(v)
        out.append("verdict: does not fit; the smallest change that fits:")
        out.append(format_plan(v.suggestion))
        out.append("  train with: "
                   + " ".join(f"--set {o}" for o in v.suggestion.knobs.overrides()))
    else:
        out.append(f"verdict: does not fit, and none of the {len(v.tried) - 1} changes tried fits:")
        out += _tried_lines(v)
    out.append("note: " + NOTES)
    return "\n".join(out)
