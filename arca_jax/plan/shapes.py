"""A run's shapes without its weights: the model's config, the batch and sampler sizes
(`Shapes`), and the base parameters, train state and training batch as abstract arrays
(`jax.ShapeDtypeStruct`s carrying `NamedSharding`s) laid out as the trainer places them."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from arca_jax import parallel, prompts, qwen3, sampling
from arca_jax.batch import build_batch
from arca_jax.config import RunConfig
from arca_jax.plan.errors import PlanError


def model_config(cfg: RunConfig) -> qwen3.Qwen3Config:
    """The model's shapes: a local directory's config.json, else the preset of that name
    ("Qwen/Qwen3-8B-Base" -> `qwen3.preset`). Nothing is downloaded or loaded."""
    path = cfg.model.resolved_path()
    if os.path.isfile(os.path.join(path, "config.json")):
        return qwen3.Qwen3Config.from_hf(path)
    try:
        return qwen3.preset(cfg.model.path)
    except KeyError:
        known = sorted(qwen3.config._PRESETS) + sorted(qwen3.config._MOE_PRESETS)
        raise PlanError(f"model.path {cfg.model.path!r}: no local config.json and no preset of "
                        f"that name (known: {', '.join(known)}); plan "
                        "loads no weights, so a released model's name is enough") from None


def _sds(tree, shardings):
    """`tree`'s leaves as ShapeDtypeStructs carrying the matching `shardings`."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The run's sizes. rows B (completions per step), T = P + N tokens per training row;
    sampler rows B' (B rounded up to the devices holding different rows), prompt width P' and
    generation width N' (bucketed to powers of two, at least 16, as `sampling.generate`);
    eval_rows: the evaluation's pass@k decoding slots (min(eval_batch_size, num_eval_problems) x
    pass_k, rounded up likewise), 0 when the evaluation is not planned; compiled as one batch of
    that many rows (the same cache and decode step as the refilling evaluation; its admissions of
    the waiting problems are not compiled)."""

    rows: int
    prompt: int
    new_tokens: int
    sampler_rows: int
    sampler_prompt: int
    sampler_new_tokens: int
    eval_rows: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.new_tokens

    @classmethod
    def of(cls, cfg: RunConfig, devices: int, evaluation: bool = False) -> "Shapes":
        """devices: those holding different rows (data x fsdp)."""
        r, t = cfg.rollout, cfg.train
        rows = cfg.batch_size
        eval_rows = (min(t.eval_batch_size, cfg.task.num_eval_problems)
                     * (t.pass_k or r.group_size)) if evaluation else 0
        up = lambda n: -(-n // devices) * devices  # noqa: E731
        return cls(rows, r.max_prompt_tokens, r.max_new_tokens, up(rows),
                   prompts.bucket_size(r.max_prompt_tokens, 16),
                   prompts.new_token_columns(r.max_new_tokens), up(eval_rows) if eval_rows else 0)


def abstract_model(cfg: RunConfig, config: qwen3.Qwen3Config, mesh):
    """(params, train state, optimizer): base parameters (model.dtype) and the step-0 train
    state as ShapeDtypeStructs laid out as the trainer places them."""
    from arca_jax.trainer import setup

    params = qwen3.param_shapes(config, jnp.dtype(cfg.model.dtype))
    params = _sds(params, parallel.param_shardings(params, mesh))
    optimizer = setup.build_optimizer(cfg)
    state = jax.eval_shape(lambda: setup.init_state(cfg, config, optimizer))
    state = _sds(state, parallel.state_shardings(state, mesh, config.num_key_value_heads))
    return params, state, optimizer


def abstract_batch(cfg: RunConfig, shapes: Shapes, mesh):
    """The rollout's training `Batch` [B, T] as `batch.build_batch` makes it (old_logps too
    when grpo.num_iterations > 1), sharded as the train step takes it."""
    B, Pw, N = shapes.rows, shapes.prompt, shapes.new_tokens
    i32, f32 = jnp.int32, jnp.float32
    sd = jax.ShapeDtypeStruct
    out = sampling.SampleOutput(tokens=sd((B, N), i32), mask=sd((B, N), i32),
                                logps=sd((B, N), f32), lengths=sd((B,), i32),
                                finished=sd((B,), jnp.bool_), num_steps=sd((), i32),
                                sampled_logps=sd((B, N), f32))
    batch = jax.eval_shape(lambda ids, o, a: build_batch(ids, ids, o, a),
                           sd((B, Pw), i32), out, sd((B,), f32))
    if cfg.grpo.num_iterations > 1:
        batch = batch.replace(old_logps=batch.sample_logps)
    return _sds(batch, parallel.batch_shardings(batch, mesh))
