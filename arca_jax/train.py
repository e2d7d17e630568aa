"""The training program: sample, score, update, evaluate, checkpoint and resume.

Each step draws `prompts_per_step` training problems (a pure function of the seed and the step,
so a resumed run sees exactly the data of an uninterrupted one), samples `group_size`
completions per prompt with the current adapter (the jitted KV-cache sampler), decodes and scores
them with the task's reward, computes group advantages and runs the jitted GRPO step
`grpo.num_iterations` times. Held-out greedy accuracy and pass@k are measured before training
(the base model), every `train.eval_every` steps and at the end.

Randomness: one root key `PRNGKey(train.seed)`; the adapter init, the step's sampling and the
evaluation's sampling use `fold_in` of distinct constants and the step, never a reused key.
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

from arca_jax import checkpoint, configlib, credit, hf, lora, parallel, sampling
from arca_jax.config import ConfigError, RunConfig, check_environment
from arca_jax.logprobs import next_tokens, shift_right, token_logprobs
from arca_jax.objective import Batch, advantages
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


def load_model(cfg: RunConfig) -> Model:
    """Loads the base checkpoint and its tokenizer through the Hugging Face code path."""
    from transformers import AutoTokenizer

    path = cfg.model.local_dir()
    model_config, params = hf.load_pretrained(path, dtype=jnp.dtype(cfg.model.dtype))
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
    tokens = np.asarray(out.tokens)
    mask = np.asarray(out.mask).astype(bool)
    return tokenizer.batch_decode([t[m].tolist() for t, m in zip(tokens, mask)],
                                  skip_special_tokens=True)


def step_prompt_indices(seed: int, step: int, num_problems: int, count: int) -> np.ndarray:
    """The training problems of `step`: a pure function of (seed, step), the data position."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_problems, size=count, replace=count > num_problems)


def evaluate(model: Model, adapter, lora_scale: float, problems, score: Scorer, cfg: RunConfig,
             step: int, key: jax.Array) -> EvalResult:
    """Greedy accuracy and pass@k (k samples per problem at the rollout temperature / top-p)."""
    k = cfg.train.pass_k or cfg.rollout.group_size
    greedy, sampled = [], []
    bs = cfg.train.eval_batch_size
    for start in range(0, len(problems), bs):
        chunk = problems[start:start + bs]
        ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in chunk],
                                   cfg.rollout.max_prompt_tokens, model.pad_id)
        common = dict(config=model.config, max_new_tokens=cfg.rollout.max_new_tokens, lora=adapter,
                      lora_scale=lora_scale, eos_id=model.eos_id, pad_id=model.pad_id)
        out = sampling.generate(model.params, ids, mask, rng=key, greedy=True, **common)
        greedy.append(score(decode(model.tokenizer, out), chunk))
        rep = sampling.repeat_groups(ids, mask, k)
        out = sampling.generate(model.params, rep.ids, rep.mask, rng=jax.random.fold_in(key, start),
                                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                **common)
        sampled.append(score(decode(model.tokenizer, out), [p for p in chunk for _ in range(k)])
                       .reshape(len(chunk), k))
    if not problems:
        return EvalResult(step, float("nan"), float("nan"), k, 0)
    greedy_r = np.concatenate(greedy)
    sampled_r = np.concatenate(sampled)
    return EvalResult(step=step, greedy_accuracy=float(greedy_r.mean()),
                      pass_at_k=float(mean_pass_at_k(sampled_r > 0.5, k)), k=k,
                      num_problems=len(problems))


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


def all_token_weights(params, adapter, batch: Batch, *, config, lora_scale: float, eps: float,
                      sharpening: float) -> Dict[str, jax.Array]:
    """Every method's token weights [B, T] on the same trajectories (for samples.jsonl and the
    report's credit heatmap): one adapted and one base forward."""
    from arca_jax import qwen3

    fwd = dict(config=config, attention_mask=batch.attention_mask, positions=batch.positions,
               return_logits=False)
    h = qwen3.forward(params, batch.input_ids, lora=adapter, lora_scale=lora_scale, **fwd).hidden
    h0 = qwen3.forward(params, batch.input_ids, **fwd).hidden
    targets = next_tokens(batch.input_ids)
    logp, ent = token_logprobs(params, h, targets, config=config)
    ref, _ = token_logprobs(params, h0, targets, config=config, with_entropy=False)
    resid = jnp.linalg.norm((h - h0).astype(jnp.float32), axis=-1)
    inputs = dict(logps=shift_right(logp), ref_logps=shift_right(ref),
                  entropies=shift_right(ent), residual_norms=shift_right(resid))
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
    ckpt = os.path.join(run_dir, "checkpoints")
    exists = os.path.isdir(run_dir) and os.listdir(run_dir)
    if exists and not resume:
        raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it "
                          "or choose another --output-dir (runs are never overwritten)")
    if resume and not os.path.isdir(ckpt):
        if exists:
            raise RunDirError(f"--resume: {run_dir} has no checkpoints/ to resume from")
    os.makedirs(run_dir, exist_ok=True)
    if resume and os.path.exists(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            import yaml
            saved = yaml.safe_load(f)
        if saved != configlib.to_dict(cfg):
            raise RunDirError(f"--resume: the config differs from {run_dir}/config.yaml; resume "
                              "with the same config (or start a new run directory)")
    if jax.process_index() == 0:
        configlib.dump(cfg, os.path.join(run_dir, "config.yaml"))


def _host_metrics(m: StepMetrics) -> Dict[str, float]:
    return {k: float(v) for k, v in dataclasses.asdict(m).items()}


def train(cfg: RunConfig, run_dir: str, *, resume: bool = False,
          log: Optional[RunLog] = None, stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Runs (or resumes) a training run in `run_dir` and returns the summary.

    stop_after: end after this many steps of this invocation (a checkpoint is written), as if
    preempted; for tests and for splitting a run across jobs.
    """
    t_start = time.time()
    devices = jax.devices()
    check_environment(cfg, len(devices))
    prepare_run_dir(run_dir, cfg, resume)
    is_main = jax.process_index() == 0
    log = log or RunLog(run_dir, enabled=is_main)

    model = load_model(cfg)
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

    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    start_step, record = 0, {}
    if resume and ckpt.latest_step() is not None:
        state, record, start_step = ckpt.restore(state)
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            if is_main:
                truncate_jsonl(os.path.join(run_dir, name), start_step)
        log.message(f"resumed from the checkpoint of step {start_step}")

    mode = cfg.train.mode
    mesh = None
    params_for_step = model.params
    if mode == "pmap":
        params_for_step = parallel.replicate(model.params)
    elif mode == "mesh":
        mesh = parallel.make_mesh(data=len(devices) // cfg.train.mesh_fsdp, fsdp=cfg.train.mesh_fsdp)
        params_for_step = parallel.shard_params(model.params, mesh)
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
                       score, cfg, step, jax.random.fold_in(jax.random.fold_in(root, _EVAL), step))
        evals.append(res)
        log.eval(dataclasses.asdict(res))

    if start_step == 0 and not any(e.step == 0 for e in evals):
        run_eval(0)  # the base model, before training

    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    step = start_step
    rewards_seen: List[float] = list(record.get("rewards_seen", []))
    with _Preemption() as pre:
        while step < cfg.train.steps:
            t0 = time.time()
            idx = step_prompt_indices(cfg.train.seed, step, len(train_task.problems), P)
            problems = [train_task.problems[i] for i in idx]
            ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in problems],
                                       cfg.rollout.max_prompt_tokens, model.pad_id)
            groups = sampling.repeat_groups(ids, mask, G)
            out = sampling.generate(model.params, groups.ids, groups.mask, config=model.config,
                                    rng=jax.random.fold_in(jax.random.fold_in(root, _SAMPLE), step),
                                    max_new_tokens=cfg.rollout.max_new_tokens,
                                    lora=current_adapter(), lora_scale=lora_scale,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    eos_id=model.eos_id, pad_id=model.pad_id)
            texts = decode(model.tokenizer, out)
            t1 = time.time()
            rewards = score(texts, [p for p in problems for _ in range(G)]).reshape(P, G)
            t2 = time.time()
            adv = advantages(jnp.asarray(rewards), cfg.grpo.estimator, eps=1e-6).reshape(-1)
            tb = sampling.build_batch(groups.ids, groups.mask, out)
            batch = Batch(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                          completion_mask=tb.completion_mask, advantages=adv.astype(jnp.float32),
                          positions=tb.positions,
                          old_logps=tb.sample_logps if cfg.grpo.num_iterations > 1 else None)
            for _ in range(cfg.grpo.num_iterations):
                state, metrics = train_step(state, params_for_step, batch)
            m = _host_metrics(metrics)  # the only host read of the step's results
            t3 = time.time()
            n_tokens = int(np.asarray(out.mask).sum())
            row = {"step": step + 1, "reward_mean": float(rewards.mean()),
                   "reward_std": float(rewards.std()), **m,
                   "residual_norm_mean": m["residual_norm_mean"] if cfg.grpo.weighting == "arca" else None,
                   "residual_norm_max": m["residual_norm_max"] if cfg.grpo.weighting == "arca" else None,
                   "reward_timeouts": score.timeouts,
                   "time_sample_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2,
                   "step_time_s": t3 - t0, "tokens_per_s": n_tokens / max(t3 - t0, 1e-9)}
            rewards_seen.append(row["reward_mean"])
            log.metrics(row)
            log.progress(step + 1, cfg.train.steps, row)
            step += 1

            every = cfg.train.samples_every
            if is_main and cfg.train.samples_per_log and every and step % every == 0:
                _log_samples(log, model, current_adapter(), lora_scale, cfg, batch, texts, rewards,
                             problems, step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                run_eval(step)
            stopping = pre.signal is not None or (stop_after is not None and step - start_step >= stop_after)
            if step == cfg.train.steps or stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                if step == cfg.train.steps:
                    run_eval(step)
                ckpt.save(step, state, {"step": step, "data_position": step, "seed": cfg.train.seed,
                                        "evals": [dataclasses.asdict(e) for e in evals],
                                        "rewards_seen": rewards_seen})
            if stopping and step < cfg.train.steps:
                why = f"signal {pre.signal}" if pre.signal is not None else f"stop_after={stop_after}"
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


_weights_jit = jax.jit(all_token_weights, static_argnames=("config", "lora_scale", "eps", "sharpening"))


def _log_samples(log: RunLog, model: Model, adapter, lora_scale, cfg: RunConfig, batch: Batch,
                 texts, rewards, problems, step: int):
    n = min(cfg.train.samples_per_log, len(texts))
    G = cfg.rollout.group_size
    rows = [i * G for i in range(min(n, len(problems)))]  # one completion from each of n prompts
    sub = jax.tree_util.tree_map(lambda x: None if x is None else x[np.asarray(rows)], batch)
    weights = _weights_jit(model.params, adapter, sub, config=model.config, lora_scale=lora_scale,
                           eps=cfg.grpo.eps, sharpening=cfg.grpo.sharpening)
    weights = {m: np.asarray(w) for m, w in weights.items()}
    cm = np.asarray(sub.completion_mask).astype(bool)
    ids = np.asarray(sub.input_ids)
    flat_rewards = rewards.reshape(-1)
    for j, r in enumerate(rows):
        toks = ids[j][cm[j]].tolist()
        log.sample({"step": step, "prompt": problems[r // G].prompt, "completion": texts[r],
                    "reward": float(flat_rewards[r]),
                    "tokens": [model.tokenizer.decode([t]) for t in toks],
                    "weights": {m: w[j][cm[j]].round(6).tolist() for m, w in weights.items()}})
