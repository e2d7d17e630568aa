"""The training program: sample, score, update, evaluate, checkpoint and resume.

Each step draws `prompts_per_step` training problems (a pure function of the seed and the step,
so a resumed run sees exactly the data of an uninterrupted one), samples `group_size`
completions per prompt with the current adapter (the jitted KV-cache sampler), decodes and scores
them with the task's reward, computes group advantages and runs the jitted GRPO step
`grpo.num_iterations` times. Held-out greedy accuracy and pass@k are measured before training
(the base model), every `train.eval_every` steps and at the end.

Randomness: one root key `PRNGKey(train.seed)`; the adapter init, the step's sampling and the
evaluation's sampling use `fold_in` of distinct constants and the step, never a reused key.

Mode "mesh" (one host or several; see `arca_jax.distributed`): one global ("data", "fsdp") mesh over
every process's devices; the base weights load straight into their fsdp layout on it (no device
holds the whole model). Every process draws the same prompts (the same seeded stream) and builds
the same prompt array; each holds the rows of the batch its devices own (`RowLayout`: the batch
axis is sharded over the whole mesh, processes own contiguous blocks of rows) and the global
arrays are assembled with `jax.make_array_from_process_local_data`. Sampling runs as one SPMD
program on the mesh, so each process's devices generate its own rows with the weights as the
train step holds them (never gathered onto one host); the sampler's random numbers do not depend
on the sharding, so the completions equal a single-process run's. Each process decodes and
scores only the rows it owns; the rewards (a float per row) are all-gathered, so every process
computes the same advantages and reward statistics. Evaluation and the samples log run on the
mesh the same way (rows padded to a multiple of the device count). Only process 0 writes logs,
samples and the summary; every process takes part in checkpoint saves and restores (Orbax).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from arca_jax import checkpoint, configlib, credit, distributed, hf, lora, parallel, sampling
from arca_jax.config import ConfigError, RunConfig, check_environment
from arca_jax.logprobs import next_tokens, shift_right, token_logprobs
from arca_jax.objective import Batch, advantages, floored_reference, residual_norms
from arca_jax.runlog import RunLog, truncate_jsonl
from arca_jax.tasks import load_task
from arca_jax.tasks.metrics import mean_pass_at_k
from arca_jax.train_step import StepMetrics, TrainState, make_optimizer, make_train_step

_INIT, _SAMPLE, _EVAL = 0, 1, 2  # fold_in constants of the root key


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (exists without --resume, nothing to resume)."""


@dataclasses.dataclass
class Model:
    """The frozen base model and what sampling needs to talk to it."""

    config: Any
    params: Any
    tokenizer: Any
    eos_id: int
    pad_id: int


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    greedy_accuracy: float
    pass_at_k: float
    k: int
    num_problems: int


def load_model(cfg: RunConfig, mesh=None) -> Model:
    """Loads the base checkpoint and its tokenizer through the Hugging Face code path. With a
    `mesh`, each weight goes straight to its fsdp layout on the mesh (`parallel.param_shardings`;
    no device ever holds the whole model)."""
    from transformers import AutoTokenizer
    from arca_jax import qwen3

    path = cfg.model.local_dir()
    dtype = jnp.dtype(cfg.model.dtype)
    shardings = None
    if mesh is not None:
        shapes = qwen3.param_shapes(qwen3.Qwen3Config.from_hf(path), dtype)
        shardings = parallel.param_shardings(shapes, mesh)
    model_config, params = hf.load_pretrained(path, dtype=dtype, shardings=shardings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_config.eos_token_id
    if eos is None:
        raise ConfigError(f"model.path: {path} defines no EOS token (tokenizer or config.json)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Model(model_config, params, tokenizer, int(eos), int(pad))


def encode_prompts(tokenizer, prompts: Sequence[str], max_tokens: int, pad_id: int):
    """Left-padded prompt ids and mask [B, P] int32 (prompts longer than `max_tokens` keep their
    last `max_tokens` tokens)."""
    rows = [ids[-max_tokens:] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    width = max(1, max(map(len, rows)))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def decode(tokenizer, out: sampling.SampleOutput) -> List[str]:
    return decode_rows(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))


def decode_rows(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> List[str]:
    mask = np.asarray(mask).astype(bool)
    return tokenizer.batch_decode([t[m].tolist() for t, m in zip(np.asarray(tokens), mask)],
                                  skip_special_tokens=True)


def step_prompt_indices(seed: int, step: int, num_problems: int, count: int) -> np.ndarray:
    """The training problems of `step`: a pure function of (seed, step), the data position."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_problems, size=count, replace=count > num_problems)


def evaluate(model: Model, adapter, lora_scale: float, problems, score: Scorer, cfg: RunConfig,
             step: int, key: jax.Array, mesh=None) -> EvalResult:
    """Greedy accuracy and pass@k (k samples per problem at the rollout temperature / top-p).

    The problems run in chunks of `train.eval_batch_size`. With a `mesh` (model.params placed on
    it, every process calling this alike) each chunk is sampled on the whole mesh, its rows
    padded to a multiple of the device count, and each process scores its own rows.
    """
    k = cfg.train.pass_k or cfg.rollout.group_size
    n = len(problems)
    if not problems:
        return EvalResult(step, float("nan"), float("nan"), k, 0)
    greedy_r = np.zeros(n, np.float32)
    sampled_r = np.zeros((n, k), np.float32)
    bs = cfg.train.eval_batch_size
    for start in range(0, n, bs):
        chunk = problems[start:start + bs]
        ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in chunk],
                                   cfg.rollout.max_prompt_tokens, model.pad_id)
        common = dict(config=model.config, max_new_tokens=cfg.rollout.max_new_tokens, lora=adapter,
                      lora_scale=lora_scale, eos_id=model.eos_id, pad_id=model.pad_id)
        sampled_kw = dict(rng=jax.random.fold_in(key, start), temperature=cfg.rollout.temperature,
                          top_p=cfg.rollout.top_p, **common)
        rows = slice(start, start + len(chunk))
        if mesh is None:
            out = sampling.generate(model.params, ids, mask, rng=key, greedy=True, **common)
            greedy_r[rows] = score(decode(model.tokenizer, out), chunk)
            rep = sampling.repeat_groups(ids, mask, k)
            out = sampling.generate(model.params, rep.ids, rep.mask, **sampled_kw)
            sampled_r[rows] = score(decode(model.tokenizer, out),
                                    [p for p in chunk for _ in range(k)]).reshape(len(chunk), k)
        else:
            out, layout, _, _ = mesh_generate(model, mesh, ids, mask, rng=key, greedy=True, **common)
            greedy_r[rows] = score_rows(layout, out, len(chunk), chunk.__getitem__, score,
                                        model.tokenizer)[0]
            out, layout, _, _ = mesh_generate(model, mesh, np.repeat(ids, k, 0),
                                              np.repeat(mask, k, 0), **sampled_kw)
            sampled_r[rows] = score_rows(layout, out, len(chunk) * k, lambda i: chunk[i // k],
                                         score, model.tokenizer)[0].reshape(len(chunk), k)
    return EvalResult(step=step, greedy_accuracy=float(greedy_r.mean()),
                      pass_at_k=float(mean_pass_at_k(sampled_r > 0.5, k)), k=k,
                      num_problems=n)


@dataclasses.dataclass
class Scorer:
    """The task's reward on completions, counting reward timeouts over the run."""

    task: Any
    timeout_s: float
    timeouts: int = 0

    def __call__(self, completions, problems) -> np.ndarray:
        res = self.task.score_batch(completions, problems, timeout_s=self.timeout_s)
        self.timeouts += int(res.timeouts)
        return np.asarray(res.rewards, np.float32)


class RowLayout:
    """Which rows of a [B, ...] batch, sharded over the mesh like the train step's batch
    (`parallel.batch_spec`), this process holds and which it owns (scores).

    local: rows held by this process's devices (sorted); owned: the rows this process answers
    for (each row's lowest-numbered holding process; with the batch over the whole mesh a row
    has one holder, so owned == local). With one process both are every row.
    """

    def __init__(self, mesh, batch_size: int):
        self.mesh = mesh
        self.batch_size = B = batch_size
        self.sharding = NamedSharding(mesh, parallel.batch_spec(B, mesh))
        me = jax.process_index()
        self.owner = np.full(B, np.iinfo(np.int32).max, np.int64)
        local = np.zeros(B, bool)
        for dev, index in self.sharding.devices_indices_map((B,)).items():
            rows = np.arange(B)[index[0]]
            self.owner[rows] = np.minimum(self.owner[rows], dev.process_index)
            if dev.process_index == me:
                local[rows] = True
        self.local = np.flatnonzero(local)
        self.owned = np.flatnonzero(self.owner == me)

    def to_global(self, full: np.ndarray) -> jax.Array:
        """A global [B, ...] array from a host array every process holds in full (each passes
        only its own rows: `jax.make_array_from_process_local_data`)."""
        full = np.asarray(full)
        return jax.make_array_from_process_local_data(self.sharding, full[self.local], full.shape)

    def host(self, x: jax.Array) -> np.ndarray:
        """A [B, ...] host copy of a global array holding (at least) this process's owned rows
        (other rows 0), from its addressable shards: no communication."""
        x_shape = tuple(x.shape)
        full = np.zeros(x_shape, x.dtype)
        have = np.zeros(x_shape[0], bool)
        for shard in x.addressable_shards:
            full[shard.index] = np.asarray(shard.data)
            have[np.arange(x_shape[0])[shard.index[0]]] = True
        if not have[self.owned].all():
            raise RuntimeError("a rollout array does not hold this process's rows (unexpected "
                               f"sharding {x.sharding})")
        return full

    def combine(self, tree):
        """Per-row host arrays [B, ...] filled at this process's owned rows -> the full arrays on
        every process (one all-gather of the whole tree)."""
        if jax.process_count() == 1:
            return tree
        stacked = distributed.allgather(tree)
        rows = np.arange(self.batch_size)
        return jax.tree_util.tree_map(lambda a: a[self.owner, rows], stacked)

    def gather_rows(self, x: jax.Array, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of a global [B, ...] array on every process (collective with several)."""
        if x.is_fully_addressable:
            return np.asarray(x)[rows]
        full = self.host(x)
        part = np.where((self.owner[rows] == jax.process_index()).reshape(
            (-1,) + (1,) * (full.ndim - 1)), full[rows], 0)
        stacked = distributed.allgather(part)
        return stacked[self.owner[rows], np.arange(len(rows))]


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """[n, ...] -> [rows, ...] by repeating the last row (real inputs, dropped afterwards)."""
    x = np.asarray(x)
    return x if x.shape[0] == rows else np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], 0)])


def mesh_generate(model: Model, mesh, ids: np.ndarray, mask: np.ndarray, **gen):
    """Samples the prompts [n, W] (the same host arrays on every process) as one SPMD program on
    the mesh: rows padded to a multiple of the device count, each process's devices generate its
    rows. Returns (out, layout, global ids, global mask); out has the padded row count."""
    rows = -(-ids.shape[0] // mesh.size) * mesh.size
    layout = RowLayout(mesh, rows)
    g_ids = layout.to_global(_pad_rows(ids, rows))
    g_mask = layout.to_global(_pad_rows(mask, rows))
    return sampling.generate(model.params, g_ids, g_mask, **gen), layout, g_ids, g_mask


def score_rows(layout: RowLayout, out: sampling.SampleOutput, n: int, problem_of_row, score: Scorer,
               tokenizer):
    """Each process decodes and scores the rows (< n) it owns; returns the rewards [n] and the
    completion lengths [n] of every row, on every process."""
    owned = layout.owned[layout.owned < n]
    tokens, mask = layout.host(out.tokens), layout.host(out.mask)
    rewards = np.zeros(layout.batch_size, np.float32)
    if len(owned):
        rewards[owned] = score(decode_rows(tokenizer, tokens[owned], mask[owned]),
                               [problem_of_row(int(i)) for i in owned])
    got = layout.combine({"rewards": rewards, "lengths": mask.sum(-1).astype(np.int64)})
    return got["rewards"][:n], got["lengths"][:n]


def all_token_weights(params, adapter, batch: Batch, *, config, lora_scale: float, eps: float,
                      sharpening: float, noise_floor: float) -> Dict[str, jax.Array]:
    """Every method's token weights [B, T] on the same trajectories (for samples.jsonl and the
    report's credit heatmap): one adapted and one base forward, with the training objective's
    noise floor on the ARCA and divergence saliences."""
    from arca_jax import qwen3

    fwd = dict(config=config, attention_mask=batch.attention_mask, positions=batch.positions,
               return_logits=False)
    h = qwen3.forward(params, batch.input_ids, lora=adapter, lora_scale=lora_scale, **fwd).hidden
    h0 = qwen3.forward(params, batch.input_ids, **fwd).hidden
    targets = next_tokens(batch.input_ids)
    logp, ent = token_logprobs(params, h, targets, config=config)
    ref, _ = token_logprobs(params, h0, targets, config=config, with_entropy=False)
    logps = shift_right(logp)
    valid = batch.completion_mask.astype(bool)
    inputs = dict(logps=logps, ref_logps=floored_reference(logps, shift_right(ref), noise_floor),
                  entropies=shift_right(ent),
                  residual_norms=residual_norms(h, h0, valid, noise_floor))
    return {m: credit.token_weights(m, batch.completion_mask, eps=eps, sharpening=sharpening,
                                    **inputs) for m in credit.MODES}


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


def prepare_run_dir(run_dir: str, cfg: RunConfig, resume: bool) -> None:
    """Checks and creates the run directory. With several processes, process 0 decides (the
    directory must be on a file system every host sees) and every process raises its verdict."""
    error = None
    if jax.process_index() == 0:
        try:
            _check_run_dir(run_dir, cfg, resume)
        except RunDirError as e:
            error = str(e)
    error = distributed.broadcast_text(error)
    if error is not None:
        raise RunDirError(error)
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        configlib.dump(cfg, os.path.join(run_dir, "config.yaml"))
    distributed.barrier("arca_jax.run_dir")
    os.makedirs(run_dir, exist_ok=True)


def _check_run_dir(run_dir: str, cfg: RunConfig, resume: bool) -> None:
    ckpt = os.path.join(run_dir, "checkpoints")
    exists = os.path.isdir(run_dir) and os.listdir(run_dir)
    if exists and not resume:
        raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it "
                          "or choose another --output-dir (runs are never overwritten)")
    if resume and not os.path.isdir(ckpt):
        if exists:
            raise RunDirError(f"--resume: {run_dir} has no checkpoints/ to resume from")
    if resume and os.path.isdir(ckpt) and not os.path.exists(os.path.join(run_dir, "config.yaml")):
        raise RunDirError(f"--resume: {run_dir} has checkpoints but no config.yaml, so they cannot "
                          "be checked against this config; start a new run directory")
    if resume and os.path.exists(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            import yaml
            saved = yaml.safe_load(f)
        if saved != configlib.to_dict(cfg):
            raise RunDirError(f"--resume: the config differs from {run_dir}/config.yaml; resume "
                              "with the same config (or start a new run directory)")


def _host_metrics(m: StepMetrics) -> Dict[str, float]:
    return {k: float(v) for k, v in dataclasses.asdict(m).items()}


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
    devices = jax.devices()
    nproc = jax.process_count()
    if nproc > 1 and cfg.train.mode != "mesh":
        raise ConfigError(f"a run over {nproc} processes needs train.mode=mesh (one mesh over "
                          f"every host's devices), got {cfg.train.mode!r}")
    check_environment(cfg, len(devices))
    prepare_run_dir(run_dir, cfg, resume)
    is_main = jax.process_index() == 0
    log = log or RunLog(run_dir, enabled=is_main)

    mode = cfg.train.mode
    mesh = layout = None
    if mode == "mesh":
        # process-major device order: each process's devices hold one contiguous block of rows
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        mesh = parallel.make_mesh(data=len(devices) // cfg.train.mesh_fsdp,
                                  fsdp=cfg.train.mesh_fsdp, devices=ordered)
        layout = RowLayout(mesh, cfg.batch_size)
    model = load_model(cfg, mesh)  # mesh: the base weights are placed fsdp-sharded as they load
    train_task = load_task(cfg.task.name, cfg.task.train_split, max_samples=cfg.task.max_train_samples,
                           path=cfg.task.path, reward_mode=cfg.task.reward_mode)
    eval_task = load_task(cfg.task.name, cfg.task.eval_split,
                          max_samples=cfg.task.num_eval_problems if cfg.task.path is None else None,
                          path=cfg.task.path, reward_mode=cfg.task.reward_mode)
    score = Scorer(train_task, cfg.task.reward_timeout_s)
    eval_problems = list(eval_task.problems)[:cfg.task.num_eval_problems]
    if len(train_task.problems) == 0:
        raise ConfigError(f"task {cfg.task.name!r} split {cfg.task.train_split!r} holds no problems")

    root = jax.random.PRNGKey(cfg.train.seed)
    lcfg = cfg.lora
    lora_scale = lcfg.scaling
    optimizer = make_optimizer(cfg.optim.learning_rate, warmup_steps=cfg.optim.warmup_steps,
                               total_steps=max(cfg.train.steps * cfg.grpo.num_iterations, 1),
                               weight_decay=cfg.optim.weight_decay,
                               max_grad_norm=cfg.optim.max_grad_norm)
    adapter = lora.init_lora(model.config, lcfg, jax.random.fold_in(root, _INIT))
    state = TrainState.create(adapter, optimizer, jax.random.fold_in(root, 3))
    trainable = lora.count_params(adapter)

    params_for_step = model.params
    if mode == "pmap":
        params_for_step = parallel.replicate(model.params)
    elif mode == "mesh":
        # the state lives replicated on the mesh; restoring into it keeps that placement
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    start_step, record = 0, {}
    if resume and ckpt.latest_step() is not None:
        state, record, start_step = ckpt.restore(state)
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            if is_main:
                truncate_jsonl(os.path.join(run_dir, name), start_step)
        log.message(f"resumed from the checkpoint of step {start_step}")
    if nproc > 1:
        log.message(f"{nproc} processes, {len(devices)} devices, mesh {dict(mesh.shape)}; "
                    f"process 0 holds rows {layout.local.min()}..{layout.local.max()} of "
                    f"{cfg.batch_size}")

    train_step = make_train_step(model.config, cfg.grpo, optimizer, lora_scale=lora_scale, mode=mode,
                                 mesh=mesh, microbatches=cfg.train.microbatches,
                                 lora_dropout=lcfg.dropout)
    if mode == "pmap":
        state = parallel.replicate(state)

    def current_adapter():
        return parallel.unreplicate(state.lora) if mode == "pmap" else state.lora

    evals: List[EvalResult] = [EvalResult(**r) for r in record.get("evals", [])]

    def run_eval(step: int):
        res = evaluate(model, None if step == 0 else current_adapter(), lora_scale, eval_problems,
                       score, cfg, step, jax.random.fold_in(jax.random.fold_in(root, _EVAL), step),
                       mesh=mesh)
        evals.append(res)
        log.eval(dataclasses.asdict(res))
        watchdog.beat(f"evaluation at step {step}")

    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    step = start_step
    rewards_seen: List[float] = list(record.get("rewards_seen", []))
    timeouts_seen, timeouts_total = 0, 0  # this process's count at the last step; all processes'
    # SIGTERM / SIGINT from the base evaluation on: stop after the next step, with a checkpoint
    with distributed.Watchdog(watchdog_s) as watchdog, _Preemption() as pre:
        if start_step == 0 and not any(e.step == 0 for e in evals):
            run_eval(0)  # the base model, before training
        while step < cfg.train.steps:
            t0 = time.time()
            idx = step_prompt_indices(cfg.train.seed, step, len(train_task.problems), P)
            problems = [train_task.problems[i] for i in idx]
            ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in problems],
                                       cfg.rollout.max_prompt_tokens, model.pad_id)
            sample_key = jax.random.fold_in(jax.random.fold_in(root, _SAMPLE), step)
            gen = dict(config=model.config, rng=sample_key, max_new_tokens=cfg.rollout.max_new_tokens,
                       lora=current_adapter(), lora_scale=lora_scale,
                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                       eos_id=model.eos_id, pad_id=model.pad_id)
            if layout is None:
                groups = sampling.repeat_groups(ids, mask, G)
                out = sampling.generate(model.params, groups.ids, groups.mask, **gen)
                texts = decode(model.tokenizer, out)
                t1 = time.time()
                watchdog.beat(f"sampling of step {step + 1}")
                rewards = score(texts, [p for p in problems for _ in range(G)]).reshape(P, G)
                n_tokens = int(np.asarray(out.mask).sum())
                timeouts_total = score.timeouts
                t2 = time.time()
                adv = advantages(jnp.asarray(rewards), cfg.grpo.estimator, eps=1e-6).reshape(-1)
                tb = sampling.build_batch(groups.ids, groups.mask, out)
            else:
                # every process holds the whole prompt array and contributes its own rows
                out, _, g_ids, g_mask = mesh_generate(model, mesh, np.repeat(ids, G, axis=0),
                                                      np.repeat(mask, G, axis=0), **gen)
                t1 = time.time()
                watchdog.beat(f"sampling of step {step + 1}")
                r, lengths = score_rows(layout, out, P * G, lambda i: problems[i // G], score,
                                        model.tokenizer)
                rewards = r.reshape(P, G)
                n_tokens = int(lengths.sum())
                timeouts_total += int(distributed.sum_over_processes(score.timeouts - timeouts_seen))
                timeouts_seen = score.timeouts
                t2 = time.time()
                adv = layout.to_global(np.asarray(
                    advantages(jnp.asarray(rewards), cfg.grpo.estimator, eps=1e-6)).reshape(-1))
                tb = sampling.build_batch(g_ids, g_mask, out)
            watchdog.beat(f"scoring of step {step + 1}")
            batch = Batch(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                          completion_mask=tb.completion_mask, advantages=adv.astype(jnp.float32),
                          positions=tb.positions,
                          old_logps=tb.sample_logps if cfg.grpo.num_iterations > 1 else None)
            for _ in range(cfg.grpo.num_iterations):
                state, metrics = train_step(state, params_for_step, batch)
            m = _host_metrics(metrics)  # the only host read of the step's results
            t3 = time.time()
            watchdog.beat(f"update of step {step + 1}")
            row = {"step": step + 1, "reward_mean": float(rewards.mean()),
                   "reward_std": float(rewards.std()), **m,
                   "residual_norm_mean": m["residual_norm_mean"] if cfg.grpo.weighting == "arca" else None,
                   "residual_norm_max": m["residual_norm_max"] if cfg.grpo.weighting == "arca" else None,
                   "reward_timeouts": timeouts_total,
                   "time_sample_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2,
                   "step_time_s": t3 - t0, "tokens_per_s": n_tokens / max(t3 - t0, 1e-9)}
            rewards_seen.append(row["reward_mean"])
            log.metrics(row)
            log.progress(step + 1, cfg.train.steps, row)
            step += 1

            every = cfg.train.samples_every
            if cfg.train.samples_per_log and every and step % every == 0:
                rows = np.asarray([i * G for i in range(min(cfg.train.samples_per_log, P * G, P))])
                if layout is None:
                    sub = jax.tree_util.tree_map(lambda x: x[rows], batch)
                    sub_texts = [texts[r] for r in rows]
                else:  # every process takes part (collectives); only process 0 writes
                    sub = jax.tree_util.tree_map(lambda x: layout.gather_rows(x, rows), batch)
                    sub_texts = decode_rows(model.tokenizer, sub.input_ids, sub.completion_mask)
                if is_main or layout is not None:
                    weights = _sample_weights(model, current_adapter(), lora_scale, cfg, sub, mesh)
                    _log_samples(log, model, sub, weights, sub_texts, rewards.reshape(-1)[rows],
                                 [problems[r // G] for r in rows], step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                run_eval(step)
            stopping = pre.signal is not None or (stop_after is not None and step - start_step >= stop_after)
            if nproc > 1:  # a signal may reach only some hosts: stop together
                stopping = distributed.any_process(stopping)
            if step == cfg.train.steps or stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                if step == cfg.train.steps:
                    run_eval(step)
                ckpt.save(step, state, {"step": step, "data_position": step, "seed": cfg.train.seed,
                                        "evals": [dataclasses.asdict(e) for e in evals],
                                        "rewards_seen": rewards_seen})
                watchdog.beat(f"checkpoint of step {step}")
            if stopping and step < cfg.train.steps:
                why = (f"signal {pre.signal}" if pre.signal is not None else
                       f"stop_after={stop_after}" if stop_after is not None and
                       step - start_step >= stop_after else "a signal on another process")
                log.message(f"stopped at step {step} ({why}); checkpoint saved; continue with --resume")
                ckpt.close()
                log.close()
                return {"finished": False, "step": step}

    if not evals or evals[-1].step != step:
        run_eval(step)
    summary = _summary(cfg, run_dir, evals, trainable, rewards_seen, time.time() - t_start, step)
    log.summary(summary)
    log.message(f"done: greedy accuracy {summary['base_greedy_accuracy']:.3f} -> "
                f"{summary['final_greedy_accuracy']:.3f}, pass@{summary['k']} "
                f"{summary['base_pass_at_k']:.3f} -> {summary['final_pass_at_k']:.3f}")
    ckpt.close()
    log.close()
    return summary


def _summary(cfg: RunConfig, run_dir: str, evals: List[EvalResult], trainable: int,
             rewards_seen: List[float], wall: float, steps: int) -> Dict[str, Any]:
    base = next(e for e in evals if e.step == 0)
    final = evals[-1]
    gini, effn = [], []
    path = os.path.join(run_dir, "metrics.jsonl")
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


_weights_jit = jax.jit(all_token_weights, static_argnames=("config", "lora_scale", "eps",
                                                         "sharpening", "noise_floor"))


def _sample_weights(model: Model, adapter, lora_scale, cfg: RunConfig, sub: Batch, mesh=None):
    """Every method's token weights [n, T] (host arrays) of the rows `sub`. With a mesh: on the
    mesh, rows padded to a multiple of the device count; every process must call it."""
    kw = dict(config=model.config, lora_scale=lora_scale, eps=cfg.grpo.eps,
              sharpening=cfg.grpo.sharpening, noise_floor=cfg.grpo.noise_floor)
    if mesh is None:
        return {m: np.asarray(w) for m, w in _weights_jit(model.params, adapter, sub, **kw).items()}
    n = sub.input_ids.shape[0]
    layout = RowLayout(mesh, -(-n // mesh.size) * mesh.size)
    g_sub = jax.tree_util.tree_map(lambda x: layout.to_global(_pad_rows(x, layout.batch_size)), sub)
    weights = _weights_jit(model.params, adapter, g_sub, **kw)
    return {m: layout.gather_rows(w, np.arange(n)) for m, w in weights.items()}


def _log_samples(log: RunLog, model: Model, sub: Batch, weights, texts, rewards, problems,
                 step: int):
    """One completion from each of the first prompts: `sub` holds their rows of the batch,
    `weights` their token weights per method; `texts` / `rewards` / `problems` match row for row."""
    cm = np.asarray(sub.completion_mask).astype(bool)
    ids = np.asarray(sub.input_ids)
    for j in range(len(texts)):
        toks = ids[j][cm[j]].tolist()
        log.sample({"step": step, "prompt": problems[j].prompt, "completion": texts[j],
                    "reward": float(rewards[j]),
                    "tokens": [model.tokenizer.decode([t]) for t in toks],
                    "weights": {m: np.asarray(w[j])[cm[j]].round(6).tolist()
                                for m, w in weights.items()}})
