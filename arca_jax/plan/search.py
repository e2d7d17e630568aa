"""The verdict: one setting compiled and measured (`plan_once`), and when it does not fit,
the search for the smallest change that does (`changes`, `find_fit`); `run` does both."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

from arca_jax import parallel, qwen3
from arca_jax.config import RunConfig
from arca_jax.plan.errors import PlanError, Refusal, RefusedError
from arca_jax.plan.figures import Plan, ProgramReport, report_program
from arca_jax.plan.knobs import (Knobs, Layout, default_layout, knobs_of, make_mesh,
                                 trainer_problems)
from arca_jax.plan.programs import compile_sampler, compile_train_step, sampler_gathers
from arca_jax.plan.shapes import Shapes, abstract_batch, abstract_model, model_config
from arca_jax.plan.targets import Target


def rollout_mesh(cfg: RunConfig, mesh):
    """The mesh the run's sampler uses (`trainer.setup.rollout_mesh`: the train mesh, or the
    layout of its devices `rollout.mesh_fsdp` / `rollout.mesh_tensor` ask for); PlanError when
    the devices do not split so."""
    from arca_jax.trainer import setup

    try:
        return setup.rollout_mesh(cfg, mesh)
    except ValueError as e:
        raise PlanError(f"rollout.mesh_fsdp / rollout.mesh_tensor: {e}") from None


def _program_reports(cfg: RunConfig, target: Target, knobs: Knobs, config, mesh, sample_mesh,
                     shapes: Shapes, abstract, options, reuse: Optional[Plan], log,
                     hlo_dir: Optional[str], gather: bool = False) -> Iterator[ProgramReport]:
    """The reports of `knobs`' programs, each as soon as it is compiled: the train step on
    `mesh`, then the sampler's on `sample_mesh`; those of `reuse` where its knobs give the same
    program (the train step: the same layout, remat and microbatches; the sampler's: the same
    layout and rollout mesh). abstract: (params, state, optimizer, batch), laid out on `mesh`."""
    params, state, optimizer, batch = abstract
    tag = (f"{knobs.layout.data}-{knobs.layout.fsdp}-{knobs.layout.tensor}"
           f"_remat-{knobs.remat}_mb-{knobs.microbatches}_")
    shape = dict(sample_mesh.shape)
    sampler_tag = tag + ("" if sample_mesh is mesh else
                         "rollout-" + "-".join(str(shape[a]) for a in parallel.AXES) + "_")
    same_step = (reuse is not None and reuse.program("train_step") is not None
                 and dataclasses.replace(reuse.knobs, rollout_tensor=None)
                 == dataclasses.replace(knobs, rollout_tensor=None))
    if same_step:
        yield reuse.program("train_step")
    else:
        train = compile_train_step(cfg, config, mesh, knobs, params, state, optimizer, batch,
                                   options)
        log(f"compiled train_step in {train.compile_s:.0f} s")
        yield report_program(train, target, hlo_dir, tag)
    if (reuse is not None and reuse.knobs.layout == knobs.layout
            and reuse.knobs.rollout_tensor == knobs.rollout_tensor):
        yield from (p for p in reuse.programs if p.name != "train_step")
        return
    sampler = compile_sampler(cfg, config, sample_mesh, shapes, params, state, target.platform,
                              options, gather=gather)
    log("compiled " + ", ".join(f"{p.name} in {p.compile_s:.0f} s" for p in sampler))
    yield from (report_program(p, target, hlo_dir, sampler_tag) for p in sampler)


def plan_once(cfg: RunConfig, target: Target, knobs: Knobs, options=None,
              reuse: Optional[Plan] = None, log=lambda text: None,
              evaluation: bool = False, hlo_dir: Optional[str] = None) -> Plan:
    """Compiles every program of `knobs` on `target` and reports them. `reuse`: a plan of the
    same layout whose sampler programs are still valid (only remat or microbatches changed).
    A program the compiler refuses for lack of device memory ends the plan there: it does not
    fit (`Plan.refused`, with the compiler's figure); any other compiler error passes through.
    evaluation: also the evaluation's pass@k sampling (`Shapes.eval_rows`). The plan carries the
    train state's bytes per device, split over fsdp and replicated over it
    (`parallel.train_state_bytes`)."""
    cfg = knobs.config(cfg)
    config = model_config(cfg)
    mesh = make_mesh(knobs.layout, target.devices)
    sample_mesh = rollout_mesh(cfg, mesh)
    shapes = Shapes.of(cfg, knobs.layout.row_shards, evaluation)
    params, state, optimizer = abstract_model(cfg, config, mesh)
    abstract = (params, state, optimizer, abstract_batch(cfg, shapes, mesh))
    gather = sampler_gathers(cfg, sample_mesh, params, target.platform, target.hbm_bytes)
    reports: List[ProgramReport] = []
    refused = None
    try:
        for report in _program_reports(cfg, target, knobs, config, mesh, sample_mesh, shapes,
                                       abstract, options, reuse, log, hlo_dir, gather):
            reports.append(report)
    except RefusedError as e:
        refused = e.refusal
        log(f"does not fit: the compiler refused {refused.program} ({refused.message})")
    kv = config.num_key_value_heads
    return Plan(cfg.model.path, target, knobs, shapes, tuple(reports),
                tuple(trainer_problems(cfg, knobs)), parallel.train_state_bytes(state, mesh, kv),
                parallel.train_state_bytes(state, mesh, kv, fsdp=False), refused,
                sampler_gathered=gather,
                sampler_layout=None if sample_mesh is mesh else Layout(
                    *(int(dict(sample_mesh.shape)[a]) for a in parallel.AXES)))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The plan of the asked setting; when it does not fit, the first change that does (or None)
    and every setting tried, in order, with its peak memory per device (`Plan.peak_bytes`) and
    the compiler's refusal for lack of memory (None: it compiled). faster: where the asked
    setting fits but its decode loop gathers the weights at every step
    (`Plan.decode_gathers_weights`), the tensor axis for the rollouts alone that fits, keeps the
    weights in place and has the shortest rollout (`find_faster`; None: none shorter than the
    asked one, or not looked for); rollouts: then each setting's `rollout_seconds` (None: no
    figure)."""

    plan: Plan
    suggestion: Optional[Plan]
    tried: Tuple[Knobs, ...]
    peaks: Tuple[Optional[int], ...] = ()
    refusals: Tuple[Optional[Refusal], ...] = ()
    faster: Optional[Plan] = None
    rollouts: Tuple[Optional[float], ...] = ()


def _valid_tensors(config, devices: int) -> List[int]:
    """The tensor axis sizes (2, 4, 8, 16) that divide the devices and split the model evenly."""
    out = []
    for t in (2, 4, 8, 16):
        if devices % t or config.num_attention_heads % t or config.intermediate_size % t:
            continue
        try:
            parallel.check_tensor(config, t)
        except ValueError:
            continue
        out.append(t)
    return out


class Change(NamedTuple):
    """One change `find_fit` may try: its name, knobs -> changed knobs (None: does not apply),
    and whether it moves only the sampler's programs (tried only when one of those is the
    largest or the refused one)."""

    name: str
    apply: Callable[[Knobs], Optional[Knobs]]
    sampler_only: bool = False


def changes(cfg: RunConfig, devices: int) -> List[Change]:
    """The changes to try, in order: every device on fsdp; each tensor axis size (2, 4, ...)
    the model allows (`parallel.check_tensor`) for the rollouts alone (`rollout.mesh_tensor`;
    not for a mixture of experts, whose sampler has no tensor parallelism), then for both;
    remat; microbatches doubled (up to four times, while the trainer accepts them)."""
    config = model_config(cfg)
    tensors = _valid_tensors(config, devices)

    def fsdp(k: Knobs) -> Optional[Knobs]:
        widest = Layout(1, devices // k.layout.tensor, k.layout.tensor)
        return dataclasses.replace(k, layout=widest) if widest.fsdp > k.layout.fsdp else None

    def tensor(t: int):
        def change(k: Knobs) -> Optional[Knobs]:
            return (dataclasses.replace(k, layout=Layout(1, devices // t, t))
                    if t > k.layout.tensor else None)
        return change

    def rollout_tensor(t: int):
        def change(k: Knobs) -> Optional[Knobs]:
            return (dataclasses.replace(k, rollout_tensor=t)
                    if t > max(k.rollout_tensor or 1, k.layout.tensor) else None)
        return change

    def remat(k: Knobs) -> Optional[Knobs]:
        return None if k.remat else dataclasses.replace(k, remat=True)

    def microbatches(k: Knobs) -> Optional[Knobs]:
        more = dataclasses.replace(k, microbatches=k.microbatches * 2)
        return None if trainer_problems(cfg, more) else more

    moe = isinstance(config, qwen3.Qwen3MoeConfig)
    return ([Change("fsdp", fsdp)]
            + [Change(f"rollout tensor={t}", rollout_tensor(t), True)
               for t in ([] if moe else tensors)]
            + [Change(f"tensor={t}", tensor(t)) for t in tensors]
            + [Change("remat", remat)] + [Change("microbatches", microbatches)] * 4)


def _sampler_bound(p: Plan) -> bool:
    """Whether `p`'s refused program, or else its program of the largest peak, is one of the
    sampler's (a change of the rollout mesh alone can help)."""
    if p.refused is not None:
        return p.refused.program != "train_step"
    if not p.programs:
        return False
    return max(p.programs, key=lambda r: r.memory.peak).name != "train_step"


def run(cfg: RunConfig, target: Target, layout: Optional[Layout] = None, options=None,
        search: bool = True, max_tries: int = 6, log=lambda text: None,
        evaluation: bool = False, hlo_dir: Optional[str] = None) -> Verdict:
    """Plans `cfg` on `target` (layout: `default_layout` when None); when it does not fit and
    `search`, looks for the smallest change that does (`find_fit`). options: XLA compiler
    options for every compile (e.g. {"xla_backend_optimization_level": 0} in CPU tests).
    evaluation: also plan the evaluation's pass@k sampling. hlo_dir: write every compiled
    program's HLO text there."""
    model_config(cfg)  # a model plan cannot build fails before anything compiles
    layout = layout or default_layout(cfg, target.size)
    log(f"compiling for {target.name}, mesh {layout}")
    first = plan_once(cfg, target, knobs_of(cfg, layout), options, log=log,
                      evaluation=evaluation, hlo_dir=hlo_dir)
    if not search:
        return Verdict(first, None, (first.knobs,), (first.peak_bytes,), (first.refused,))
    if first.fits is not False:
        faster, others = find_faster(cfg, first, options, max_tries, log, hlo_dir)
        plans = (first,) + others
        return Verdict(first, None, tuple(p.knobs for p in plans),
                       tuple(p.peak_bytes for p in plans), tuple(p.refused for p in plans),
                       faster, tuple(None if p.refused is not None or p.rollout_s is None
                                     else rollout_seconds(p) for p in plans))
    return find_fit(cfg, first, options, max_tries, log, hlo_dir)


def find_faster(cfg: RunConfig, first: Plan, options=None, max_tries: int = 6,
                log=lambda text: None,
                hlo_dir: Optional[str] = None) -> Tuple[Optional[Plan], Tuple[Plan, ...]]:
    """For a setting that fits but whose decode loop all-gathers the weights at every step
    (`Plan.decode_gathers_weights`): each rollout-only tensor axis of `changes` (the train step
    reused; at most `max_tries` compiles). Of those that fit and gather no weights in their
    decode loop, the one of the shortest rollout (`rollout_seconds`), when shorter than the
    asked setting's. Returns it (None: none, or nothing needed it) and every plan compiled, in
    order."""
    tried: List[Plan] = []
    if not first.decode_gathers_weights:
        return None, ()
    for what, change, sampler_only in changes(cfg, first.target.size):
        k = change(first.knobs) if sampler_only else None
        if k is None:
            continue
        if len(tried) >= max_tries:
            break
        log(f"the decode loop gathers the weights at every step; trying {what}")
        tried.append(plan_once(cfg, first.target, k, options, reuse=first, log=log,
                               evaluation=first.shapes.eval_rows > 0, hlo_dir=hlo_dir))
    good = [p for p in tried if p.fits is not False and not p.decode_gathers_weights]
    best = min(good, key=rollout_seconds, default=None)
    if best is None or rollout_seconds(best) >= rollout_seconds(first):
        return None, tuple(tried)
    return best, tuple(tried)


def rollout_seconds(p: Plan) -> float:
    """A rollout's roofline plus its interconnect estimate (no overlap assumed; a missing
    figure counts 0, and a plan without a roofline counts as infinitely long)."""
    if p.rollout_s is None:
        return float("inf")
    return p.rollout_s + (p.rollout_interconnect_s or 0.0)


def _lower(p: Plan, best: Plan) -> bool:
    """Whether `p`'s peak is known and below `best`'s (a refusal without a figure: unknown)."""
    return p.peak_bytes is not None and (best.peak_bytes is None
                                         or p.peak_bytes < best.peak_bytes)


def find_fit(cfg: RunConfig, first: Plan, options=None, max_tries: int = 6,
             log=lambda text: None, hlo_dir: Optional[str] = None) -> Verdict:
    """Tries the `changes` of a plan that does not fit, in order, each recompiled on the same
    target (at most `max_tries` compiles), until one fits. A change that lowers the peak memory
    is kept for the next ones; one that does not is dropped, so the answer is the smallest
    combination found along the way. A setting the compiler refuses for lack of memory does not
    fit (its peak: the compiler's figure) and the search goes on."""
    best, tried, by_layout = first, [first.knobs], {}
    peaks, refusals = [first.peak_bytes], [first.refused]
    if first.refused is None:
        by_layout[first.knobs.layout] = first
    for what, change, sampler_only in changes(cfg, first.target.size):
        k = change(best.knobs)
        if k is None or k in tried or (sampler_only and not _sampler_bound(best)):
            continue
        if len(tried) > max_tries:
            break
        log(f"does not fit; trying {what}: mesh {k.layout}, remat {k.remat}, "
            f"microbatches {k.microbatches}, rollout tensor {k.rollout_tensor or '-'}")
        p = plan_once(cfg, first.target, k, options, reuse=by_layout.get(k.layout), log=log,
                      evaluation=first.shapes.eval_rows > 0, hlo_dir=hlo_dir)
        tried.append(k)
        peaks.append(p.peak_bytes)
        refusals.append(p.refused)
        if p.refused is None:
            by_layout.setdefault(k.layout, p)
        if p.fits:
            return Verdict(first, p, tuple(tried), tuple(peaks), tuple(refusals))
        if _lower(p, best) and not p.problems:
            best = p
    return Verdict(first, None, tuple(tried), tuple(peaks), tuple(refusals))
