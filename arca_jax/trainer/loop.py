"""The training loop: rollout -> update -> log -> evaluate -> checkpoint, resumable.

Each step draws `prompts_per_step` training problems (a pure function of the seed and the step,
so a resumed run sees exactly the data of an uninterrupted one; with `rollout.dynamic_sampling`
the extra rounds' problems are pure functions of (seed, step, round) as well), rolls out
`group_size` completions per prompt with the current adapter (`rollout.rollout`), and runs the
jitted GRPO step `grpo.num_iterations` times. Held-out greedy accuracy and pass@k are measured before
training (the base model), every `train.eval_every` steps and at the end.

Modes: "jit" (one device), "pmap" (data parallel over the local devices) and "mesh" (one global
("data", "fsdp", "tensor") mesh over every process's devices, see `arca_jax.distributed` and
`arca_jax.parallel`; the base weights load straight into their sharded layout). Only process 0 writes logs, samples and the summary; every
process takes part in checkpoint saves and restores (Orbax).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from arca_jax import credit, distributed, faults, lora, parallel, replicas, rundir
from arca_jax.config import ConfigError, RunConfig, check_environment
from arca_jax.grpo.objective import policy_logprobs
from arca_jax.grpo.signals import residual_layers
from arca_jax.grpo.step import StepMetrics, make_train_step
from arca_jax.runlog import RunLog
from arca_jax.trainer import setup
from arca_jax.trainer.evaluate import EvalResult, evaluate
from arca_jax.trainer.programs import StepPrograms
from arca_jax.trainer.rollout import Scorer, rollout, step_prompt_indices
from arca_jax.trainer.samples import log_samples
from arca_jax.trainer.setup import Stream, stream_key


class _Preemption:
    """Turns SIGTERM / SIGINT into a flag checked between steps (checkpoint, then exit)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# old_logps for num_iterations > 1: the training forward without dropout, once per batch, so
# the first update's ratio is 1 up to dropout (not the sampler's fused path, which differs from
# the training forward by bf16 rounding).
_old_logps = jax.jit(policy_logprobs, static_argnames=("config", "lora_scale", "grpo_config"))


def _host_metrics(m: StepMetrics) -> Dict[str, Any]:
    """Scalars as floats, per-layer arrays ([S], [Ls, E]) as (nested) lists of floats; fields a
    model does not have (a dense model's aux_loss and expert_load, None) are left out, so that
    null in metrics.jsonl keeps its one meaning: a NaN or inf value."""
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()
            for k, v in dataclasses.asdict(m).items() if v is not None}


@dataclasses.dataclass
class _Run:
    """What the loop's steps share: built once by `_start`."""

    cfg: RunConfig
    run_dir: str
    log: RunLog
    model: setup.Model
    mesh: Any
    layout: parallel.RowLayout
    train_task: Any
    eval_problems: list
    score: Scorer
    state: Any
    params_for_step: Any
    train_step: Any
    ckpt: Any
    start_step: int
    record: dict
    programs: Optional[StepPrograms] = None  # the packed step (`train.pack`), else None

    def adapter(self):
        """The current adapter, unreplicated."""
        pmap = self.cfg.train.mode == "pmap"
        return parallel.unreplicate(self.state.lora) if pmap else self.state.lora


def _state_memory(state, mesh, kv_heads: int) -> str:
    """One line: the train state's bytes per device on the mesh (`parallel.train_state_bytes`),
    and what they would be replicated over fsdp."""
    split = parallel.train_state_bytes(state, mesh, kv_heads)
    mib = 2.0 ** 20
    line = (f"train state per device: {split.total / mib:.2f} MiB (adapter "
            f"{split.adapter / mib:.2f}, optimiser {split.optimizer / mib:.2f}, gradient "
            f"{split.gradient / mib:.2f})")
    fsdp = parallel.axis_size(mesh, parallel.FSDP)
    if fsdp == 1:
        return line
    whole = parallel.train_state_bytes(state, mesh, kv_heads, fsdp=False)
    return f"{line}, split over fsdp {fsdp} ({whole.total / mib:.2f} MiB if replicated)"


def _sampler_devices(cfg: RunConfig, log) -> None:
    """ConfigError for a `rollout.replicas` the process cannot give; a message when rollouts
    sample on several devices (`arca_jax.replicas`)."""
    try:
        devices = replicas.devices(cfg.rollout.replicas, cfg.batch_size, cfg.rollout.max_batch)
    except ValueError as e:
        raise ConfigError(f"rollout.{e}") from None
    if devices:
        log.message(f"rollouts sample on {len(devices)} {devices[0].platform} devices at once, "
                    f"each its own share of the prompt groups (rollout.replicas)")


def _start(cfg: RunConfig, run_dir: str, resume: bool, log: Optional[RunLog]) -> _Run:
    """Checks the run directory, loads model and tasks, builds (or restores) the train state and
    compiles nothing yet."""
    nproc = jax.process_count()
    if nproc > 1 and cfg.train.mode != "mesh":
        raise ConfigError(f"a run over {nproc} processes needs train.mode=mesh (one mesh over "
                          f"every host's devices), got {cfg.train.mode!r}")
    check_environment(cfg, len(jax.devices()))
    cache_note = setup.check_compilation_cache(nproc)  # before the first collective compiles
    setup.prepare_run_dir(run_dir, cfg, resume)
    log = log or RunLog(run_dir, enabled=jax.process_index() == 0)
    if cache_note:
        log.message(cache_note)
    mesh = setup.make_run_mesh(cfg)
    layout = parallel.RowLayout(mesh, cfg.batch_size)
    if mesh is None:
        _sampler_devices(cfg, log)
    elif (sample_mesh := setup.rollout_mesh(cfg, mesh)) is not mesh:
        sample = dict(sample_mesh.shape)
        log.message(f"rollouts and evaluation sample on the mesh data {sample['data']} x fsdp "
                    f"{sample['fsdp']} x tensor {sample['tensor']} of the same devices "
                    "(rollout.mesh_fsdp / rollout.mesh_tensor)")
    model = setup.load_model(cfg, mesh)  # mesh: base weights placed sharded (`parallel`)
    adapted = setup.lora_config(cfg, model.config).targets  # ConfigError for targets it refuses
    if adapted != cfg.lora.targets:
        log.message(f"lora.targets: the default list adapts a mixture-of-experts model's "
                    f"attention projections {list(adapted)}; name the experts' projections "
                    f"with 'gate' (the router), or a subset, to adapt them")
    try:
        residual_layers(cfg.grpo, model.config.num_hidden_layers)
    except ValueError as e:  # a layer index the model does not have
        raise ConfigError(f"grpo.{e}") from None
    train_task = setup.load_train_task(cfg)
    _, eval_problems = setup.load_eval_task(cfg)
    optimizer = setup.build_optimizer(cfg)
    state = setup.init_state(cfg, model.config, optimizer)
    params_for_step = model.params
    if cfg.train.mode == "pmap":
        params_for_step = parallel.replicate(model.params)
    elif mesh is not None:  # the state's layout on the mesh (ZeRO over fsdp); restoring keeps it
        state = parallel.shard_lora(state, mesh, model.config.num_key_value_heads)
        log.message(_state_memory(state, mesh, model.config.num_key_value_heads))
    ckpt = setup.open_checkpoints(cfg, run_dir)
    start_step, record = 0, {}
    if resume:
        # the newest intact checkpoint (damaged ones moved aside); none: restart from step 0
        state, record, start_step = setup.resume_state(ckpt, state, log)
        if jax.process_index() == 0:
            setup.trim_step_logs(run_dir, start_step if record else -1)
        log.message(f"resumed from the checkpoint of step {start_step}" if record else
                    f"no checkpoint in {ckpt.directory}: restarting the run from step 0 (the "
                    "records the interrupted attempt logged are dropped)")
    if nproc > 1:
        log.message(f"{nproc} processes, {len(jax.devices())} devices, mesh {dict(mesh.shape)}; "
                    f"process 0 holds rows {layout.local.min()}..{layout.local.max()} of "
                    f"{cfg.batch_size}")
    train_step = make_train_step(model.config, setup.objective_config(cfg), optimizer,
                                 lora_scale=cfg.lora.scaling,
                                 mode=cfg.train.mode, mesh=mesh,
                                 microbatches=cfg.train.microbatches,
                                 lora_dropout=cfg.lora.dropout)
    if cfg.train.mode == "pmap":
        state = parallel.replicate(state)
    programs = None
    if cfg.train.pack and cfg.train.mode == "jit" and cfg.train.microbatches == 1:
        # line counts in quarters of the batch: at most four compiled steps per run, and each
        # step's count depends on its batch alone (a resumed run packs as an uninterrupted one)
        programs = StepPrograms(train_step, rows=cfg.batch_size,
                                share_prompts=setup.share_prompts(cfg, model.config),
                                line_width=setup.line_width(cfg, model),
                                store=setup.step_store(cfg, model.config))
    elif cfg.train.pack:
        log.message(f"train.pack applies to train.mode=jit with train.microbatches=1; this run "
                    f"(mode {cfg.train.mode}, {cfg.train.microbatches} microbatches) trains on "
                    "padded rows")
    return _Run(cfg, run_dir, log, model, mesh, layout, train_task, eval_problems,
                Scorer(train_task, cfg.task.reward_timeout_s), state, params_for_step,
                train_step, ckpt, start_step, record, programs=programs)


# Running totals of the run (kept in the checkpoint record, so a resumed run logs what an
# uninterrupted one does): reward timeouts, rewards that were NaN/inf/not a number (scored 0),
# advantages that were not finite (set to 0).
TOTALS = ("reward_timeouts", "reward_invalid", "advantage_invalid")


def _beat_and_mark(beat, step: int):
    def on_phase(what: str):
        beat(f"{what} of step {step}")
        if what == "sampling":  # sampling done: scoring starts
            faults.point("scoring", step)
    return on_phase


def _train_one_step(run: _Run, step: int, totals: Dict[str, int], beat) -> tuple:
    """Rollout and update of step `step` (0-based); returns (metrics row, problems, rollout).
    `totals` (the running `TOTALS`) is updated in place."""
    cfg = run.cfg
    t0 = time.time()
    pool = run.train_task.problems

    def draw(round_: int) -> list:  # the step's problems; round >= 1: dynamic sampling's extra
        idx = step_prompt_indices(cfg.train.seed, step, len(pool), cfg.rollout.prompts_per_step,
                                  round=round_)
        return [pool[i] for i in idx]

    faults.point("sampling", step + 1)
    ro = rollout(run.model, run.mesh, run.layout, draw(0), cfg, adapter=run.adapter(),
                 key=stream_key(cfg, Stream.SAMPLE, step), score=run.score,
                 beat=_beat_and_mark(beat, step + 1), draw=draw)
    problems = ro.problems
    totals["reward_timeouts"] += run.score.new_timeouts()
    totals["reward_invalid"] += run.score.new_invalid()
    totals["advantage_invalid"] += ro.num_invalid_advantages
    faults.point("update", step + 1)
    batch = ro.batch
    step_fn = run.train_step
    occupancy = {}
    if run.programs is not None:  # the forwards run on the real tokens only (`arca_jax.packing`)
        batch = run.programs.pack(batch)
        slots, tokens = run.programs.occupancy(batch)
        occupancy = {"update_slots": slots, "update_fill": tokens / max(slots, 1)}
        ahead = cfg.train.prepare_ahead
        if ahead is None:
            ahead = jax.default_backend() != "cpu"
        ahead = ahead and run.programs.store is None  # a stored run loads instead
        step_fn = functools.partial(run.programs, ahead=ahead and step + 1 < cfg.train.steps)
    if cfg.grpo.num_iterations > 1:  # the policy before this batch's updates, as the step scores it
        batch = batch.replace(old_logps=_old_logps(run.adapter(), run.model.params, batch,
                                                   config=run.model.config,
                                                   lora_scale=cfg.lora.scaling,
                                                   grpo_config=setup.objective_config(cfg)))
    t2 = time.time()
    for _ in range(cfg.grpo.num_iterations):
        run.state, metrics = step_fn(run.state, run.params_for_step, batch)
    m = _host_metrics(metrics)  # the only host read of the step's results
    t3 = time.time()
    beat(f"update of step {step + 1}")
    arca = "residual_norms" in credit.required_inputs(cfg.grpo.weighting)  # reads the residual
    per_layer = m.pop("residual_norm_layers")  # logged only for decoder layers (arca_layers)
    if arca and cfg.grpo.arca_layers != "final":
        m["residual_norm_layers"] = per_layer
    # every completion sampled this step (with dynamic sampling: all rounds, not only the batch)
    row = {"step": step + 1, "reward_mean": float(ro.sampled_rewards.mean()),
           "reward_std": float(ro.sampled_rewards.std()), **m,
           "residual_norm_mean": m["residual_norm_mean"] if arca else None,
           "residual_norm_max": m["residual_norm_max"] if arca else None,
           **{k: int(totals[k]) for k in TOTALS},
           "completions_truncated": ro.num_truncated, "completions_empty": ro.num_empty,
           "time_sample_s": ro.time_sample_s, "time_score_s": ro.time_score_s,
           "time_update_s": t3 - t2, "step_time_s": t3 - t0,
           "tokens_per_s": ro.num_tokens / max(t3 - t0, 1e-9),
           "sample_tokens_per_s": ro.num_tokens / max(ro.time_sample_s, 1e-9),
           "slot_utilisation": ro.num_tokens / max(ro.slot_steps, 1), **occupancy}
    row.update(_objective_counts(cfg, ro))
    return row, problems, ro


def _objective_counts(cfg: RunConfig, ro) -> Dict[str, Any]:
    """The logged counts of the DAPO settings that are on (none when all are off, so a default
    run's metrics.jsonl keeps its keys): dynamic sampling's dropped all-equal groups, extra
    rounds, all-equal groups kept to fill the batch and the batch's own reward mean; the
    overlong penalty's penalised completions and mean; truncated completions masked out."""
    r, out = cfg.rollout, {}
    if r.dynamic_sampling:
        out.update(groups_dropped=ro.groups_dropped, resample_rounds=ro.resample_rounds,
                   groups_zero_kept=ro.groups_zero_kept,
                   batch_reward_mean=float(ro.rewards.mean()))
    if r.overlong_buffer:
        out.update(overlong_penalised=ro.overlong_penalised,
                   overlong_penalty_mean=ro.overlong_penalty_mean)
    if r.overlong_filtering:
        out["truncated_masked"] = ro.truncated_masked
    return out


def train(cfg: RunConfig, run_dir: str, *, resume: bool = False,
          log: Optional[RunLog] = None, stop_after: Optional[int] = None,
          watchdog_s: Optional[float] = None) -> Dict[str, Any]:
    """Runs (or resumes) a training run in `run_dir` and returns the summary.

    stop_after: end after this many steps of this invocation (a checkpoint is written), as if
    preempted; for tests and for splitting a run across jobs.
    watchdog_s: end the process (exit code 4) when no phase of a step (sampling, scoring, update,
    evaluation, checkpoint) completes for this many seconds; None or 0: off. Compilation counts
    against it, so leave room for the first step.
    With several processes (`arca_jax.distributed.initialize` first) every process calls this
    with the same arguments; the run needs train.mode="mesh".
    """
    t_start = time.time()
    run = _start(cfg, run_dir, resume, log)
    try:
        return _run_steps(run, t_start, stop_after, watchdog_s)
    finally:
        if run.programs is not None:
            run.programs.close()  # what is still queued is not needed any more
            store = run.programs.store
            if store is not None:
                run.log.message(f"compiled train steps in {store.directory}: {store.hits} "
                                f"loaded, {store.writes} written (train.store_programs)")


def _run_steps(run: _Run, t_start: float, stop_after: Optional[int],
               watchdog_s: Optional[float]) -> Dict[str, Any]:
    """`train`'s loop over the steps, from `run.start_step`."""
    # The loop reads top to bottom (step, log, samples, eval, stop/save); its parts share the
    # watchdog, the preemption flag and the running records, so it stays one function.
    cfg, run_dir = run.cfg, run.run_dir
    log, step, nproc = run.log, run.start_step, jax.process_count()
    evals: List[EvalResult] = [EvalResult(**r) for r in run.record.get("evals", [])]
    rewards_seen: List[float] = list(run.record.get("rewards_seen", []))
    totals = {k: int(run.record.get(k, 0)) for k in TOTALS}

    def run_eval(at: int):
        faults.point("eval", at)
        # at step 0 the adapter is init_lora's (B = 0, so x A B = 0 exactly): the base model,
        # evaluated through the adapted programs that every later evaluation reuses
        res = evaluate(run.model, run.adapter(), cfg.lora.scaling,
                       run.eval_problems, run.score, cfg, at, stream_key(cfg, Stream.EVAL, at),
                       mesh=run.mesh)
        totals["reward_timeouts"] += run.score.new_timeouts()  # the evaluation's own
        totals["reward_invalid"] += run.score.new_invalid()
        evals.append(res)
        log.eval(dataclasses.asdict(res))
        watchdog.beat(f"evaluation at step {at}")

    # SIGTERM / SIGINT from the base evaluation on: stop after the next step, with a checkpoint
    with distributed.Watchdog(watchdog_s) as watchdog, _Preemption() as pre:
        if step == 0 and not any(e.step == 0 for e in evals):
            run_eval(0)  # the base model, before training
        while step < cfg.train.steps:
            row, problems, ro = _train_one_step(run, step, totals, watchdog.beat)
            rewards_seen.append(row["reward_mean"])
            log.metrics(row)
            log.progress(step + 1, cfg.train.steps, row)
            step += 1
            every = cfg.train.samples_every
            if cfg.train.samples_per_log and every and step % every == 0:
                faults.point("samples", step)
                log_samples(log, run.model, run.adapter(), cfg, ro.batch, run.layout, ro.rewards,
                            problems, step, run.mesh)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                run_eval(step)
            stopping = pre.signal is not None or (stop_after is not None
                                                  and step - run.start_step >= stop_after)
            if nproc > 1:  # a signal may reach only some hosts: stop together
                stopping = distributed.any_process(stopping)
            save_due = cfg.train.save_every and step % cfg.train.save_every == 0
            if step == cfg.train.steps or stopping or save_due:
                if step == cfg.train.steps:
                    run_eval(step)
                log.flush()  # every record of the steps the checkpoint holds, before it exists
                run.ckpt.save(step, run.state, {
                    "step": step, "data_position": step, "seed": cfg.train.seed,
                    "evals": [dataclasses.asdict(e) for e in evals], "rewards_seen": rewards_seen,
                    **totals})
                watchdog.beat(f"checkpoint of step {step}")
            if stopping and step < cfg.train.steps:
                why = (f"signal {pre.signal}" if pre.signal is not None else
                       f"stop_after={stop_after}" if stop_after is not None and
                       step - run.start_step >= stop_after else "a signal on another process")
                log.message(f"stopped at step {step} ({why}); checkpoint saved; continue with --resume")
                run.ckpt.close()
                log.close()
                return {"finished": False, "step": step}

    if not evals or evals[-1].step != step:
        run_eval(step)
    summary = _summary(cfg, run_dir, evals, lora.count_params(run.adapter()), rewards_seen,
                       time.time() - t_start, step)
    log.summary(summary)
    log.message(f"done: greedy accuracy {summary['base_greedy_accuracy']:.3f} -> "
                f"{summary['final_greedy_accuracy']:.3f}, pass@{summary['k']} "
                f"{summary['base_pass_at_k']:.3f} -> {summary['final_pass_at_k']:.3f}")
    run.ckpt.close()
    log.close()
    return summary


def _summary(cfg: RunConfig, run_dir: str, evals: List[EvalResult], trainable: int,
             rewards_seen: List[float], wall: float, steps: int) -> Dict[str, Any]:
    base = next(e for e in evals if e.step == 0)
    final = evals[-1]
    gini, effn = [], []
    path = rundir.path(run_dir, rundir.METRICS)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                gini.append(r["weight_gini"])
                effn.append(r["effective_token_ratio"])
    return {"method": cfg.grpo.weighting, "rank": cfg.lora.rank, "trainable_params": trainable,
            "base_greedy_accuracy": base.greedy_accuracy, "base_pass_at_k": base.pass_at_k,
            "final_greedy_accuracy": final.greedy_accuracy, "final_pass_at_k": final.pass_at_k,
            "k": final.k, "num_eval_problems": final.num_problems,
            "mean_train_reward": float(np.mean(rewards_seen)) if rewards_seen else None,
            "mean_weight_gini": float(np.mean(gini)) if gini else None,
            "mean_effective_token_ratio": float(np.mean(effn)) if effn else None,
            "steps": steps, "wall_time_s": round(wall, 1), "finished": True}
