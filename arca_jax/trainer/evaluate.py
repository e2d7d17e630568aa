"""Held-out evaluation: greedy accuracy and pass@k, on the rollout's generate-and-score path."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Tuple

import jax
import numpy as np

from arca_jax.config import RunConfig
from arca_jax.tasks.metrics import mean_pass_at_k
from arca_jax.trainer.rollout import Scorer, encode_prompts, generate_rows, score_rows
from arca_jax.trainer.setup import Model, sampler_options


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation (a line of eval.jsonl). Per problem, in evaluation order: `greedy` the
    greedy completion's reward, `correct_of_k` how many of the k samples scored > 0.5 (what the
    report's per-problem intervals and paired comparisons read)."""

    step: int
    greedy_accuracy: float
    pass_at_k: float
    k: int
    num_problems: int
    greedy: Tuple[float, ...] = ()
    correct_of_k: Tuple[int, ...] = ()


def greedy_rewards(model: Model, adapter, lora_scale: float, problems: Sequence[Any],
                   score: Scorer, cfg: RunConfig, key: jax.Array, mesh=None) -> np.ndarray:
    """Reward [n] of each problem's greedy completion: one generation of `train.eval_batch_size`
    slots (a finished row hands its slot to the next problem)."""
    r = cfg.rollout
    ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in problems],
                               r.max_prompt_tokens, model.pad_id, r.prompt_truncation)
    gen = generate_rows(model, mesh, ids, mask, rng=key, greedy=True,
                        max_new_tokens=r.max_new_tokens, lora=adapter, lora_scale=lora_scale,
                        max_batch=cfg.train.eval_batch_size,
                        shrink=r.shrink, replicas=r.replicas,
                        **sampler_options(cfg, model, mesh))
    return score_rows(gen, len(problems), problems.__getitem__, score, model.tokenizer)[0]


def evaluate(model: Model, adapter, lora_scale: float, problems: Sequence[Any], score: Scorer,
             cfg: RunConfig, step: int, key: jax.Array, mesh=None) -> EvalResult:
    """Greedy accuracy and pass@k (k = `train.pass_k`, default the group size; k samples per
    problem at the rollout temperature / top-k / top-p / min-p) of `adapter` (None: the base model).

    Each runs as one generation over all problems with `train.eval_batch_size` problems' rows
    decoding at once (continuous refill: a row that ends hands its slot to the next waiting
    one; the cache holds eval_batch_size x k rows). The samples use the key fold_in(key, 0),
    row by row as one batch of all problems would. With a `mesh` (model.params placed on it,
    every process calling this alike) the slots split over the mesh and each process scores
    its own rows.
    """
    k = cfg.train.pass_k or cfg.rollout.group_size
    n = len(problems)
    if not problems:
        return EvalResult(step, float("nan"), float("nan"), k, 0)
    greedy_r = greedy_rewards(model, adapter, lora_scale, problems, score, cfg, key, mesh)
    r = cfg.rollout
    ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in problems],
                               r.max_prompt_tokens, model.pad_id, r.prompt_truncation)
    gen = generate_rows(model, mesh, ids, mask, group_size=k, rng=jax.random.fold_in(key, 0),
                        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                        max_new_tokens=r.max_new_tokens, lora=adapter, lora_scale=lora_scale,
                        max_batch=cfg.train.eval_batch_size * k,
                        shrink=r.shrink, replicas=r.replicas,
                        **sampler_options(cfg, model, mesh))
    sampled_r = score_rows(gen, n * k, lambda i: problems[i // k], score,
                           model.tokenizer)[0].reshape(n, k)
    correct = sampled_r > 0.5
    return EvalResult(step=step, greedy_accuracy=float(greedy_r.mean()),
                      pass_at_k=float(mean_pass_at_k(correct, k)), k=k, num_problems=n,
                      greedy=tuple(float(x) for x in greedy_r),
                      correct_of_k=tuple(int(c) for c in correct.sum(axis=1)))
