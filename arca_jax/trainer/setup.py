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

from arca_jax import (checkpoint, configlib, credit, distributed, hf, hostinfo, lora, parallel,
                      qwen3, rundir)
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
    `mesh`, each weight goes straight to its layout on the mesh (`parallel.param_shardings`;
    no device ever holds the whole model)."""
    path = cfg.model.local_dir()
    dtype = jnp.dtype(cfg.model.dtype)
    shardings = None
    if mesh is not None:
        model_config = qwen3.Qwen3Config.from_hf(path)
        check_tensor(cfg, model_config)  # before any weight is read
        shapes = qwen3.param_shapes(model_config, dtype)
        shardings = parallel.param_shardings(shapes, mesh)
    model_config, params = hf.load_pretrained(path, dtype=dtype, shardings=shardings)
    tokenizer = hf.load_tokenizer(path)
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


def lora_config(cfg: RunConfig, model_config) -> lora.LoraConfig:
    """The run's adapter settings on this model: `cfg.lora`, except that on a mixture-of-experts
    model (`qwen3.Qwen3MoeConfig`) the full default target list (`lora.ALL_TARGETS`, "every
    projection") adapts the attention projections q, k, v, o only; any other list is taken as
    written (MLP projections: every expert, not the MLP of dense layers; "gate": the router).
    ConfigError for targets the model cannot take (`lora.check_targets`: the router of a dense
    model, dropout on expert or router adapters)."""
    c = cfg.lora
    if isinstance(model_config, qwen3.Qwen3MoeConfig) and set(c.targets) == set(lora.ALL_TARGETS):
        return dataclasses.replace(c, targets=qwen3.ATTN_PROJS)
    try:
        lora.check_targets(model_config, c.targets, dropout=c.dropout)
    except ValueError as e:
        raise ConfigError(f"lora.targets: {e}") from None
    return c


def merge_lora(cfg: RunConfig, model: Model) -> bool:
    """Whether rollouts and evaluation sample from merged weights (`rollout.merge_lora`; None:
    on CPU with float32 weights only)."""
    if cfg.rollout.merge_lora is not None:
        return cfg.rollout.merge_lora
    dtype = model.params["embed_tokens"]["embedding"].dtype
    return jax.default_backend() == "cpu" and dtype == jnp.float32


def gather_weights(cfg: RunConfig, model: Model, mesh) -> bool:
    """Whether rollouts and evaluation on `mesh` gather the sampling weights over "fsdp" once
    per generation (`rollout.gather_weights`; None: `parallel.gather_weights` against the
    device's published memory, `plan.chip_of`: the same answer on every process)."""
    if mesh is None:
        return False
    from arca_jax.plan.targets import chip_of

    return parallel.gather_weights(cfg.rollout.gather_weights, mesh,
                                   parallel.tree_bytes(model.params),
                                   chip_of(mesh.devices.flat[0]).hbm_bytes)


def sampler_options(cfg: RunConfig, model: Model, mesh) -> dict:
    """The `generate_rows` keywords that rollouts and evaluation share for a run on `mesh` (the
    train mesh, or None): the mesh to sample on (`rollout_mesh`), and on it merged weights
    (`merge_lora`), the program store (`sampler_store`) and weights gathered over "fsdp"
    (`gather_weights`)."""
    sample_mesh = rollout_mesh(cfg, mesh)
    return dict(sample_mesh=sample_mesh, merge_lora=merge_lora(cfg, model),
                store=sampler_store(cfg, sample_mesh),
                gather_weights=gather_weights(cfg, model, sample_mesh))


def share_prompts(cfg: RunConfig, model_config) -> bool:
    """Whether the packed step shares each prompt among its group's completions
    (`train.share_prompts`; None: when the step runs on CPU): on a dense model without LoRA
    dropout only (a mixture of experts would count the shared tokens once in its routing
    statistics; dropout would draw one mask for every row sharing them)."""
    share = cfg.train.share_prompts
    if share is None:
        share = jax.default_backend() == "cpu"
    return (share and cfg.lora.dropout == 0.0
            and not isinstance(model_config, qwen3.Qwen3MoeConfig))


# W / T of shared-prompt lines by the train step's attention (`line_width`)
KERNEL_LINE_WIDTH = 4
EINSUM_LINE_WIDTH = 2


def line_width(cfg: RunConfig, model: Model) -> int:
    """W / T of the packed step's shared-prompt lines (`train.line_width`; None: 4 when the
    step's attention (`grpo.attention`) resolves to "cpu-kernel", else 2). The kernel visits
    only the key tiles a query sees, so a wider line adds no attention work and holds a whole
    GRPO group with one prompt copy; lines of 2 T split a group of 8 completions of half the
    budget into two or three blocks, each with its prompt, whose lines round the demo's batches
    up to 48 lines of 224 slots about every other step where lines of 448 need 16
    (`experiments/NOTES_vs_trl.md`, "Lines of 4 T"). The einsum attention computes every
    (query, key) pair of a line: its cost per slot grows with the line."""
    if cfg.train.line_width is not None:
        return cfg.train.line_width
    dtype = model.params["embed_tokens"]["embedding"].dtype
    kernel = qwen3.resolve_attention(cfg.grpo.attention, dtype) == "cpu-kernel"
    return KERNEL_LINE_WIDTH if kernel else EINSUM_LINE_WIDTH


def init_state(cfg: RunConfig, model_config, optimizer) -> TrainState:
    """The step-0 train state: a fresh adapter (B = 0) and its optimiser state."""
    adapter = lora.init_lora(model_config, lora_config(cfg, model_config),
                             stream_key(cfg, Stream.INIT))
    return TrainState.create(adapter, optimizer, stream_key(cfg, Stream.STATE))


def make_run_mesh(cfg: RunConfig):
    """The ("data", "fsdp", "tensor") mesh of a `train.mode: mesh` run over every process's
    devices (None otherwise): fsdp and tensor from the config, data the rest; device order as
    `parallel.make_mesh` (physical topology on TPU, process-major elsewhere)."""
    if cfg.train.mode != "mesh":
        return None
    n, t = len(jax.devices()), cfg.train
    return parallel.make_mesh(data=n // (t.mesh_fsdp * t.mesh_tensor), fsdp=t.mesh_fsdp,
                              tensor=t.mesh_tensor)


def rollout_mesh(cfg: RunConfig, mesh):
    """The mesh rollouts and evaluation sample on: `mesh` (the train mesh; None without one)
    unless `rollout.mesh_fsdp` / `rollout.mesh_tensor` lay out its devices another way
    (`parallel.reshape_mesh`, the same device order; the one left unset is 1)."""
    r = cfg.rollout
    if mesh is None or (r.mesh_fsdp is None and r.mesh_tensor is None):
        return mesh
    return parallel.reshape_mesh(mesh, r.mesh_fsdp or 1, r.mesh_tensor or 1)


def check_tensor(cfg: RunConfig, model_config) -> None:
    """ConfigError unless train.mesh_tensor and rollout.mesh_tensor split the model's heads and
    MLP evenly; a mixture-of-experts model samples without tensor parallelism
    (`qwen3.inference_weights`), so it takes tensor 1 only."""
    on_mesh = cfg.train.mode == "mesh"
    for name, tensor in (("train.mesh_tensor", cfg.train.mesh_tensor if on_mesh else 1),
                         ("rollout.mesh_tensor", (cfg.rollout.mesh_tensor or 1) if on_mesh
                          else 1)):
        if tensor > 1 and isinstance(model_config, qwen3.Qwen3MoeConfig):
            raise ConfigError(f"{name}={tensor}: tensor parallelism for a mixture-of-experts "
                              "model is not implemented (the sampler keeps its experts whole); "
                              f"use {name}=1 (rows over data and fsdp)")
        try:
            parallel.check_tensor(model_config, tensor)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


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
    except checkpoint.CheckpointError as e:
        others = [s for s in ckpt.all_steps() if s != e.step]
        hint = (f"; choose another with --checkpoint (have {others})" if others else "")
        raise checkpoint.CheckpointError(e.step, e.directory, e.reason + hint,
                                         damaged=e.damaged) from None
    finally:
        ckpt.close()
    return cfg, model, state.lora, step


def resume_state(ckpt: checkpoint.Checkpointer, like, log) -> tuple:
    """(state, record, step) of the newest intact checkpoint, for `train --resume`; (like, {}, 0)
    when there is none. A damaged checkpoint (`CheckpointError.damaged`) is moved aside into
    `checkpoints.damaged/` (kept, not deleted) with a warning and the next older one is tried;
    one whose files are intact but do not load (another version's state) ends the run with
    that error. Every process calls this; they agree on each verdict."""
    while True:
        step = ckpt.latest_step()
        if step is None:
            return like, {}, 0
        error = None
        try:
            state, record, step = ckpt.restore(like, step)
        except checkpoint.CheckpointError as e:
            error = e
        if not distributed.any_process(error is not None):
            return state, record, step
        if error is None:
            error = checkpoint.CheckpointError(step, ckpt.directory,
                                               "another process could not read it")
        if distributed.any_process(not error.damaged):  # intact files that do not load
            raise error
        dest = ckpt.set_aside(step)
        distributed.barrier(f"arca_jax.set_aside.{step}")
        ckpt.reload()
        log.message(f"warning: {error}; moved it to {dest} (kept for inspection) and falling back "
                    "to the previous checkpoint")


# --------------------------------------------------------------------------------------------
# The persistent compilation cache
# --------------------------------------------------------------------------------------------

SHARED_CACHE_ENV = "ARCA_JAX_MULTIPROCESS_COMPILATION_CACHE"
CACHE_ENV = "ARCA_JAX_COMPILATION_CACHE"
CACHE_MAX_BYTES = 4 << 30
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_OFF = ("0", "off", "false", "no", "none")


def default_cache_dir(environ=os.environ) -> str:
    """$XDG_CACHE_HOME/arca-jax/xla (default ~/.cache/arca-jax/xla)."""
    return hostinfo.cache_dir("xla", environ)


def step_static(cfg: RunConfig, model_config) -> str:
    """Everything `loop` builds the train step from besides its arguments: the inputs of
    `make_train_step` and of `build_optimizer` (`ExecutableStore`'s static text). Name a new
    input of either here."""
    import inspect

    try:  # a weighting of the user's own: its code too (this package's is in the source digest)
        weighting = inspect.getsource(credit.get(cfg.grpo.weighting).fn)
    except (OSError, TypeError):
        weighting = None
    return repr(dict(model=model_config, objective=objective_config(cfg), optim=cfg.optim,
                     optimizer_steps=cfg.train.steps * cfg.grpo.num_iterations,
                     lora_scale=cfg.lora.scaling, lora_dropout=cfg.lora.dropout,
                     mode=cfg.train.mode, microbatches=cfg.train.microbatches,
                     share_prompts=share_prompts(cfg, model_config), weighting=weighting))


def _store_wanted(cfg: RunConfig) -> bool:
    """`train.store_programs`, None resolved: on for a CPU run of one process (mode "jit") with
    the compilation cache on."""
    t = cfg.train
    if t.mode != "jit" or t.store_programs is False:
        return False
    if t.store_programs:
        return True
    return (jax.default_backend() == "cpu" and jax.process_count() == 1
            and bool(jax.config.jax_compilation_cache_dir)
            and bool(jax.config.jax_enable_compilation_cache))


def program_store_dir(environ=os.environ) -> str:
    """`ARCA_JAX_PROGRAM_STORE`, else "programs" beside `default_cache_dir()`."""
    return environ.get("ARCA_JAX_PROGRAM_STORE") or os.path.join(
        os.path.dirname(default_cache_dir(environ)), "programs")


def step_store(cfg: RunConfig, model_config, environ=os.environ):
    """The run's `executables.ExecutableStore` for its packed train steps, or None
    (`train.store_programs`, see `_store_wanted`; by default also only with `train.prepare_ahead`
    off and a weighting defined in this package, whose source the key covers)."""
    from arca_jax.trainer.executables import ExecutableStore

    if not _store_wanted(cfg):
        return None
    if cfg.train.store_programs is None:
        fn = credit.get(cfg.grpo.weighting).fn
        module = getattr(fn, "__module__", None) or ""  # None: code run by exec
        if cfg.train.prepare_ahead or not module.startswith("arca_jax."):
            return None
    return ExecutableStore(program_store_dir(environ), step_static(cfg, model_config))


_sampler_stores: dict = {}


def sampler_store(cfg: RunConfig, mesh, environ=os.environ):
    """The process's `executables.ExecutableStore` for `sampling.generate`'s programs (one per
    directory, kept for the process so that a program is loaded once), or None: with a mesh, or
    where `train.store_programs` resolves off (`_store_wanted`). The sampler's programs are
    keyed by their own static arguments (configs, settings), so one store serves every run."""
    from arca_jax.trainer.executables import ExecutableStore

    if mesh is not None or not _store_wanted(cfg):
        return None
    directory = program_store_dir(environ)
    if directory not in _sampler_stores:
        _sampler_stores[directory] = ExecutableStore(directory, "sampling.generate")
    return _sampler_stores[directory]


def use_compilation_cache(environ=os.environ) -> Optional[str]:
    """Turns on JAX's persistent compilation cache for this process unless the user configured
    one (`JAX_COMPILATION_CACHE_DIR`, kept as is) or turned it off (`ARCA_JAX_COMPILATION_CACHE=0`).
    `ARCA_JAX_COMPILATION_CACHE=DIR` picks the directory; the default is `default_cache_dir()`.
    Returns the directory in use (None: off). Call it before anything compiles.

    A second run of the same config then loads its sampler, train step and evaluation programs
    instead of compiling them. Every program is cached (no minimum compile time) unless the user
    set JAX's own `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, which is kept. The cache is
    bounded (`CACHE_MAX_BYTES`, least recently used entries evicted), which also makes JAX take a
    file lock around every read and write, so concurrent runs on one machine share it safely;
    every write then lists the whole directory (a trainer run writes tens of programs, a process
    that runs thousands of small eager programs should set a minimum compile time). A run of
    several processes turns it off again (`check_compilation_cache`)."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    choice = environ.get(CACHE_ENV, "").strip()
    if choice.lower() in _OFF:
        return None
    path = os.path.abspath(os.path.expanduser(choice)) if choice else default_cache_dir(environ)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # an unwritable location: run without the cache rather than fail
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if MIN_COMPILE_TIME_ENV not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


def check_compilation_cache(nproc: int, environ=os.environ) -> Optional[str]:
    """Turns JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) off for a run of
    several processes unless `ARCA_JAX_MULTIPROCESS_COMPILATION_CACHE=1`; returns the message to
    log (None: nothing changed). Call it before the run compiles anything.

    Why: the cache key includes the topology fingerprint of the devices, which on CPU differs
    between the processes of one run, and only process 0 writes entries; so process 0 runs
    executables compiled by an earlier run while the others compile their own. Such a pairing
    once executed mismatched collectives (gloo "Received data size doesn't match expected
    size"), and nothing guarantees that separately compiled executables agree on their
    collectives. One process is unaffected (tested)."""
    if nproc <= 1 or not jax.config.jax_compilation_cache_dir:
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    if environ.get(SHARED_CACHE_ENV, "") == "1":
        return (f"keeping the persistent compilation cache {jax.config.jax_compilation_cache_dir} "
                f"in this {nproc}-process run ({SHARED_CACHE_ENV}=1; see README, Reliability)")
    from jax._src import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    return (f"persistent compilation cache {jax.config.jax_compilation_cache_dir} turned off for "
            f"this {nproc}-process run: its processes would run executables of different "
            f"compilations (README, Reliability); {SHARED_CACHE_ENV}=1 keeps it")


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


# Settings a resumed run may change: how the run is laid out over the devices, not what it computes
# (a checkpoint restores onto any mesh, `checkpoint.Checkpointer.restore`, and the mesh step's
# results equal one device's to float rounding). A run saved with fsdp 8 on 8 devices resumes
# with fsdp 4 on 4, or on one device with both 1.
LAYOUT_SETTINGS = ("train.mesh_fsdp", "train.mesh_tensor", "rollout.mesh_fsdp",
                   "rollout.mesh_tensor")


def _without_layout(config_dict: Any) -> Any:
    """A config dict (`configlib.to_dict`) without the `LAYOUT_SETTINGS`."""
    if not isinstance(config_dict, dict):
        return config_dict
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config_dict.items()}
    for key in LAYOUT_SETTINGS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def _check_run_dir(run_dir: str, cfg: RunConfig, resume: bool) -> None:
    ckpt = rundir.path(run_dir, rundir.CHECKPOINTS)
    config_path = rundir.path(run_dir, rundir.CONFIG)
    exists = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if exists and not resume:
        raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it "
                          "or choose another --output-dir (runs are never overwritten)")
    if not resume:
        return
    if not exists:
        what = "is empty" if os.path.isdir(run_dir) else "does not exist"
        raise RunDirError(f"no run to resume in {run_dir} (the directory {what}); drop --resume "
                          "to start a new run there")
    if not os.path.exists(config_path):
        if os.path.isdir(ckpt) and os.listdir(ckpt):
            raise RunDirError(f"--resume: {run_dir} has checkpoints but no {rundir.CONFIG}, so "
                              "they cannot be checked against this config; start a new run "
                              "directory")
        raise RunDirError(f"no run to resume in {run_dir} (no {rundir.CONFIG}); drop --resume "
                          "and choose an empty or new --output-dir")
    try:
        saved = configlib.read_yaml(config_path)
    except ConfigError as e:  # a RunDirError: process 0's verdict is shared with the others
        raise RunDirError(str(e)) from None
    if _without_layout(saved) != _without_layout(configlib.to_dict(cfg)):
        raise RunDirError(f"--resume: the config differs from {config_path}; resume with "
                          f"the same config (only {', '.join(LAYOUT_SETTINGS)} may change) "
                          "or start a new run directory")


def trim_step_logs(run_dir: str, last_step: int) -> None:
    """Drops the records of steps after `last_step` from the per-step logs and the TensorBoard
    events (a resumed run rewrites them); `last_step` -1 drops every record (a run restarted
    from step 0, whose base evaluation is rewritten too)."""
    from arca_jax.runlog import truncate_jsonl
    from arca_jax.tfevents import truncate_events

    for name in rundir.STEP_LOGS:
        truncate_jsonl(rundir.path(run_dir, name), last_step)
    truncate_events(rundir.path(run_dir, rundir.TENSORBOARD), last_step)


__all__: List[str] = [
    "LAYOUT_SETTINGS", "Model", "RunDirError", "Stream", "build_optimizer", "init_state", "load_eval_task",
    "load_model", "load_run", "load_train_task", "make_run_mesh", "objective_config",
    "rollout_mesh", "sampler_options",
    "open_checkpoints", "check_compilation_cache", "use_compilation_cache", "default_cache_dir",
    "prepare_run_dir", "resume_state", "stream_key", "trim_step_logs",
]
