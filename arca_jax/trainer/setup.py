"""Everything a run builds from its `RunConfig`, each in one place: the model, the tasks, the
optimiser, the named random streams, the mesh, the train state and the run directory.

The training loop (`loop.train`) and the `eval` / `export` commands use these same builders, so a
checkpoint restores into exactly the structure the run saved.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, List, Optional

import jax
import jax.numpy as jnp
import optax

from arca_jax import checkpoint, configlib, distributed, hf, lora, parallel, qwen3, rundir
from arca_jax.config import RunConfig
from arca_jax.errors import ConfigError
from arca_jax.grpo.config import GRPOConfig
from arca_jax.grpo.step import TrainState, make_optimizer
from arca_jax.tasks import load_task


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (exists without --resume, nothing to resume)."""


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


class Stream(enum.IntEnum):
    """The run's random streams: each is `fold_in(PRNGKey(train.seed), stream)`, and per-step
    streams fold in the step as well, so no key is ever used twice."""

    INIT = 0  # the adapter's initialisation
    SAMPLE = 1  # the rollout of step s: fold_in(stream, s)
    EVAL = 2  # the evaluation at step s: fold_in(stream, s)
    STATE = 3  # TrainState.rng (the train step folds in its own step for LoRA dropout)


def stream_key(cfg: RunConfig, stream: Stream, step: Optional[int] = None) -> jax.Array:
    """The key of `stream` (at `step` for the per-step streams)."""
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), int(stream))
    return key if step is None else jax.random.fold_in(key, step)


# --------------------------------------------------------------------------------------------
# Model, tasks, optimiser, state
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """The frozen base model and what sampling needs to talk to it."""

    config: Any
    params: Any
    tokenizer: Any
    eos_id: int
    pad_id: int


def load_model(cfg: RunConfig, mesh=None) -> Model:
    """Loads the base checkpoint and its tokenizer through the Hugging Face code path. With a
    `mesh`, each weight goes straight to its fsdp layout on the mesh (`parallel.param_shardings`;
    no device ever holds the whole model)."""
    from transformers import AutoTokenizer

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


def load_train_task(cfg: RunConfig):
    """The training task (`task.train_split`); refuses an empty one."""
    t = cfg.task
    task = load_task(t.name, t.train_split, max_samples=t.max_train_samples, path=t.path,
                     reward_mode=t.reward_mode, prompt_style=t.prompt_style)
    if len(task.problems) == 0:
        raise ConfigError(f"task {t.name!r} split {t.train_split!r} holds no problems")
    return task


def load_eval_task(cfg: RunConfig):
    """(task, problems): the evaluation task and its first `task.num_eval_problems` problems."""
    t = cfg.task
    task = load_task(t.name, t.eval_split,
                     max_samples=t.num_eval_problems if t.path is None else None,
                     path=t.path, reward_mode=t.reward_mode, prompt_style=t.prompt_style)
    return task, list(task.problems)[:t.num_eval_problems]


def objective_config(cfg: RunConfig) -> GRPOConfig:
    """`cfg.grpo` with what the run decides filled in: the "dr_grpo" aggregation's constant L is
    the generation budget `rollout.max_new_tokens` unless `grpo.max_completion_length` is set
    (never the batch's width, which changes with the prompt bucket)."""
    g = cfg.grpo
    if g.max_completion_length is None:
        g = dataclasses.replace(g, max_completion_length=cfg.rollout.max_new_tokens)
    return g


def build_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """AdamW with warmup + cosine over every optimiser step of the run (steps x iterations)."""
    o = cfg.optim
    return make_optimizer(o.learning_rate, warmup_steps=o.warmup_steps,
                          total_steps=max(cfg.train.steps * cfg.grpo.num_iterations, 1),
                          weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)


def init_state(cfg: RunConfig, model_config, optimizer) -> TrainState:
    """The step-0 train state: a fresh adapter (B = 0) and its optimiser state."""
    adapter = lora.init_lora(model_config, cfg.lora, stream_key(cfg, Stream.INIT))
    return TrainState.create(adapter, optimizer, stream_key(cfg, Stream.STATE))


def make_run_mesh(cfg: RunConfig):
    """The ("data", "fsdp") mesh of a `train.mode: mesh` run over every process's devices (None
    otherwise), in process-major order: each process's devices hold one contiguous block of rows."""
    if cfg.train.mode != "mesh":
        return None
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return parallel.make_mesh(data=len(devices) // cfg.train.mesh_fsdp,
                              fsdp=cfg.train.mesh_fsdp, devices=devices)


def open_checkpoints(cfg: RunConfig, run_dir: str) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(rundir.path(run_dir, rundir.CHECKPOINTS),
                                   keep=cfg.train.keep_checkpoints)


def load_run(run_dir: str, checkpoint_step: Optional[int] = None):
    """(cfg, model, adapter, step) of a finished or interrupted run directory (for `eval` and
    `export`): the config it saved, its base model, and the adapter of the given (default: the
    latest) checkpoint."""
    from arca_jax import config

    cfg_path = rundir.path(run_dir, rundir.CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{run_dir} is not a run directory (no {rundir.CONFIG})")
    cfg = config.load(cfg_path)
    if not os.path.isdir(rundir.path(run_dir, rundir.CHECKPOINTS)):
        raise ConfigError(f"{run_dir} has no {rundir.CHECKPOINTS}/")
    model = load_model(cfg)
    like = init_state(cfg, model.config, build_optimizer(cfg))
    ckpt = open_checkpoints(cfg, run_dir)
    try:
        state, _, step = ckpt.restore(like, checkpoint_step)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    finally:
        ckpt.close()
    return cfg, model, state.lora, step


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------


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
        configlib.dump(cfg, rundir.path(run_dir, rundir.CONFIG))
    distributed.barrier("arca_jax.run_dir")
    os.makedirs(run_dir, exist_ok=True)


def _check_run_dir(run_dir: str, cfg: RunConfig, resume: bool) -> None:
    ckpt = rundir.path(run_dir, rundir.CHECKPOINTS)
    config_path = rundir.path(run_dir, rundir.CONFIG)
    exists = os.path.isdir(run_dir) and os.listdir(run_dir)
    if exists and not resume:
        raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it "
                          "or choose another --output-dir (runs are never overwritten)")
    if resume and not os.path.isdir(ckpt):
        if exists:
            raise RunDirError(f"--resume: {run_dir} has no {rundir.CHECKPOINTS}/ to resume from")
    if resume and os.path.isdir(ckpt) and not os.path.exists(config_path):
        raise RunDirError(f"--resume: {run_dir} has checkpoints but no {rundir.CONFIG}, so they "
                          "cannot be checked against this config; start a new run directory")
    if resume and os.path.exists(config_path):
        import yaml

        with open(config_path) as f:
            saved = yaml.safe_load(f)
        if saved != configlib.to_dict(cfg):
            raise RunDirError(f"--resume: the config differs from {config_path}; resume with "
                              "the same config (or start a new run directory)")


def trim_step_logs(run_dir: str, last_step: int) -> None:
    """Drops the records of steps after `last_step` from the per-step logs (a resumed run
    rewrites them)."""
    from arca_jax.runlog import truncate_jsonl

    for name in rundir.STEP_LOGS:
        truncate_jsonl(rundir.path(run_dir, name), last_step)


__all__: List[str] = [
    "Model", "RunDirError", "Stream", "build_optimizer", "init_state", "load_eval_task",
    "load_model", "load_run", "load_train_task", "make_run_mesh", "objective_config",
    "open_checkpoints",
    "prepare_run_dir", "stream_key", "trim_step_logs",
]
