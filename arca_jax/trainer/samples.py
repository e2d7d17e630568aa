"""samples.jsonl: a few completions of a step with their reward and every method's token weights
(`grpo.all_method_weights`, the loss's own salience pipeline), for the report's heatmap: the
paper's five (`credit.MODES`) and the run's `grpo.weighting` when it is another (a user's
weighting, keyed by its configured name or import path)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from arca_jax import credit, parallel
from arca_jax.batch import Batch
from arca_jax.config import RunConfig
from arca_jax.grpo.signals import all_method_weights
from arca_jax.runlog import RunLog
from arca_jax.trainer.rollout import detokenize
from arca_jax.trainer.setup import Model, objective_config

_weights_jit = jax.jit(all_method_weights,
                       static_argnames=("config", "lora_scale", "grpo_config", "methods"))


def logged_methods(cfg: RunConfig) -> tuple:
    """The methods samples.jsonl holds weights for: `credit.MODES`, then `grpo.weighting` when
    it is not one of them."""
    w = cfg.grpo.weighting
    return credit.MODES if w in credit.MODES else credit.MODES + (w,)


def method_weights_of_rows(model: Model, adapter, cfg: RunConfig, sub: Batch, mesh=None):
    """Every logged method's token weights [n, T] (host arrays; ``logged_methods``) of the rows
    `sub` (host arrays). With a mesh: computed on the mesh, rows padded to a multiple of the
    device count; every process must call it."""
    n = sub.input_ids.shape[0]
    layout = parallel.RowLayout.padded(mesh, n)
    g_sub = jax.tree_util.tree_map(layout.to_global, sub)
    weights = _weights_jit(adapter, model.params, g_sub, config=model.config,
                           lora_scale=cfg.lora.scaling, grpo_config=objective_config(cfg),
                           methods=logged_methods(cfg))
    return {m: layout.gather_rows(w, np.arange(n)) for m, w in weights.items()}


def log_samples(log: RunLog, model: Model, adapter, cfg: RunConfig, batch: Batch,
                layout: parallel.RowLayout, rewards: np.ndarray, problems: Sequence[Any],
                step: int, mesh=None) -> None:
    """Logs one completion of each of the first `train.samples_per_log` prompts of the step.
    Every process takes part (collectives on a mesh); only the logging process writes."""
    G = cfg.rollout.group_size
    P = len(problems)
    rows = np.asarray([i * G for i in range(min(cfg.train.samples_per_log, P * G, P))])
    sub = jax.tree_util.tree_map(lambda x: layout.gather_rows(x, rows), batch)
    texts = detokenize(model.tokenizer, sub.input_ids, sub.completion_mask)
    weights = method_weights_of_rows(model, adapter, cfg, sub, mesh)
    cm = np.asarray(sub.completion_mask).astype(bool)
    ids = np.asarray(sub.input_ids)
    flat_rewards = np.asarray(rewards).reshape(-1)
    for j, r in enumerate(rows):
        toks = ids[j][cm[j]].tolist()
        log.sample({"step": step, "prompt": problems[r // G].prompt, "completion": texts[j],
                    "reward": float(flat_rewards[r]),
                    "tokens": [model.tokenizer.decode([t]) for t in toks],
                    "weights": {m: np.asarray(w[j])[cm[j]].round(6).tolist()
                                for m, w in weights.items()}})
