"""Rollouts: prompts -> completions -> rewards -> advantages -> the training `Batch`.

One code path for every layout: one device, pmap (which splits batches itself) and a mesh over
one or several processes (`parallel.RowLayout`). Every process holds the same prompt array; the
sampler runs as one SPMD program (on a mesh each process's devices generate its own rows, with
the weights as the train step holds them; the sampler's random numbers do not depend on the
sharding, so the completions equal a single-device run's). Each process decodes and scores only
the rows it owns; rewards (a float per row) are all-gathered, so every process computes the same
advantages.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, List, NamedTuple, Sequence

import jax
import numpy as np

from arca_jax import distributed, parallel, sampling
from arca_jax.batch import Batch
from arca_jax.config import RunConfig
from arca_jax.grpo.objective import advantages
from arca_jax.trainer.setup import Model


def encode_prompts(tokenizer, prompts: Sequence[str], max_tokens: int, pad_id: int,
                   truncation: str = "left"):
    """Left-padded prompt ids and mask [B, P] int32 numpy. A prompt longer than `max_tokens` is
    cut on the `truncation` side (`rollout.prompt_truncation`): "left" keeps its last `max_tokens`
    tokens, "right" keeps its first `max_tokens` tokens."""
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right', got {truncation!r}")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if truncation == "left":
        rows = [ids[-max_tokens:] for ids in encoded]
    else:
        rows = [ids[:max_tokens] for ids in encoded]
    width = max(1, max(map(len, rows)))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def detokenize(tokenizer, tokens, mask) -> List[str]:
    """Texts of the masked tokens of each row ([B, N] tokens and mask), special tokens dropped."""
    mask = np.asarray(mask).astype(bool)
    return tokenizer.batch_decode([t[m].tolist() for t, m in zip(np.asarray(tokens), mask)],
                                  skip_special_tokens=True)


def _as_reward(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclasses.dataclass
class Scorer:
    """The task's reward on completions, counting reward timeouts and invalid rewards: a reward
    that is NaN, inf or not a number (a user's reward function) counts as 0 and is counted in
    `invalid` (the metrics' `reward_invalid`), so no NaN reaches the advantages."""

    task: Any
    timeout_s: float
    timeouts: int = 0
    invalid: int = 0
    _reported: int = 0
    _reported_invalid: int = 0

    def __call__(self, completions, problems) -> np.ndarray:
        res = self.task.score_batch(completions, problems, timeout_s=self.timeout_s)
        self.timeouts += int(getattr(res, "timeouts", 0) or 0)
        rewards = np.asarray([_as_reward(r) for r in np.asarray(res.rewards).reshape(-1)],
                             np.float64)
        bad = ~np.isfinite(rewards) | (np.abs(rewards) > np.finfo(np.float32).max)
        self.invalid += int(bad.sum())
        return np.where(bad, 0.0, rewards).astype(np.float32)

    def new_timeouts(self) -> int:
        """Timeouts of every process since the last call (collective with several processes)."""
        new = self.timeouts - self._reported
        self._reported = self.timeouts
        return int(distributed.sum_over_processes(new))

    def new_invalid(self) -> int:
        """Invalid rewards of every process since the last call (collective with several)."""
        new = self.invalid - self._reported_invalid
        self._reported_invalid = self.invalid
        return int(distributed.sum_over_processes(new))


class Generated(NamedTuple):
    """Completions of n prompt rows on a layout whose batch may be padded beyond n."""

    out: sampling.SampleOutput  # [rows, N], rows >= n
    layout: parallel.RowLayout
    ids: jax.Array  # [rows, P] global prompt ids
    mask: jax.Array  # [rows, P]


def generate_rows(model: Model, mesh, ids: np.ndarray, mask: np.ndarray, **gen) -> Generated:
    """Samples the prompts [n, P] (the same host arrays on every process) on `mesh` (None: the
    default device): rows padded to a multiple of the device count, each process's devices
    generate its own rows. `gen`: `sampling.generate` keywords."""
    layout = parallel.RowLayout.padded(mesh, ids.shape[0])
    g_ids, g_mask = layout.to_global(ids), layout.to_global(mask)
    out = sampling.generate(model.params, g_ids, g_mask, config=model.config, eos_id=model.eos_id,
                            pad_id=model.pad_id, mesh=mesh, **gen)
    return Generated(out, layout, g_ids, g_mask)


class Scored(NamedTuple):
    """Per row, on every process: the reward, the completion's tokens (EOS included) and
    whether it ended with EOS (False: cut at max_new_tokens)."""

    rewards: np.ndarray  # [n] float32
    lengths: np.ndarray  # [n] int64
    finished: np.ndarray  # [n] bool


def score_rows(gen: Generated, n: int, problem_of_row: Callable[[int], Any], score: Scorer,
               tokenizer) -> Scored:
    """Each process decodes and scores the rows (< n) it owns; returns the rewards [n], the
    completion lengths [n] and the finished flags [n] of every row, on every process."""
    layout = gen.layout
    owned = layout.owned[layout.owned < n]
    tokens, mask = layout.host(gen.out.tokens), layout.host(gen.out.mask)
    finished = layout.host(gen.out.finished)
    rewards = np.zeros(layout.batch_size, np.float32)
    if len(owned):
        rewards[owned] = score(detokenize(tokenizer, tokens[owned], mask[owned]),
                               [problem_of_row(int(i)) for i in owned])
    got = layout.combine({"rewards": rewards, "lengths": mask.sum(-1).astype(np.int64),
                          "finished": finished.astype(np.int32)})
    return Scored(got["rewards"][:n], got["lengths"][:n], got["finished"][:n].astype(bool))


class Rollout(NamedTuple):
    """One step's rollout: the batch to train on and what the step logs."""

    batch: Batch  # global [P * G, T], advantages set
    rewards: np.ndarray  # [P, G]
    num_tokens: int  # completion tokens generated
    time_sample_s: float
    time_score_s: float
    num_truncated: int = 0  # completions cut at max_new_tokens (never ended): trained as they are
    num_empty: int = 0  # completions that are only EOS: their text is "", scored as such
    num_invalid_advantages: int = 0  # non-finite advantages (overflowing rewards), set to 0


def rollout(model: Model, mesh, layout: parallel.RowLayout, problems: Sequence[Any], cfg: RunConfig,
            *, adapter, key: jax.Array, score: Scorer,
            beat: Callable[[str], None] = lambda what: None) -> Rollout:
    """Samples `rollout.group_size` completions of each problem with `adapter`, scores them and
    builds the batch with group advantages (`grpo.estimator`). `layout` is the train step's
    row layout of the P * G rows."""
    t0 = time.time()
    P, G, r = len(problems), cfg.rollout.group_size, cfg.rollout
    ids, mask = encode_prompts(model.tokenizer, [p.prompt for p in problems],
                               r.max_prompt_tokens, model.pad_id, r.prompt_truncation)
    gen = generate_rows(model, mesh, np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0),
                        rng=key, max_new_tokens=r.max_new_tokens, lora=adapter,
                        lora_scale=cfg.lora.scaling, temperature=r.temperature, top_p=r.top_p,
                        top_k=r.top_k)
    jax.block_until_ready(gen.out.tokens)
    t1 = time.time()
    beat("sampling")
    scored = score_rows(gen, P * G, lambda i: problems[i // G], score, model.tokenizer)
    rewards = scored.rewards.reshape(P, G)
    adv, bad_adv = finite_advantages(advantages(rewards, cfg.grpo.estimator, eps=1e-6))
    batch = sampling.build_batch(gen.ids, gen.mask, gen.out, advantages=layout.to_global(adv),
                                 mask_tokens=masked_tokens(cfg, model))
    beat("scoring")
    return Rollout(batch=batch, rewards=rewards, num_tokens=int(scored.lengths.sum()),
                   time_sample_s=t1 - t0, time_score_s=time.time() - t1,
                   num_truncated=int((~scored.finished).sum()),
                   num_empty=int((scored.finished & (scored.lengths <= 1)).sum()),
                   num_invalid_advantages=bad_adv)


def finite_advantages(adv) -> tuple:
    """(advantages [B] float32 with every non-finite one set to 0, how many were): finite rewards
    whose spread overflows float32 (e.g. +-3e38 under "rloo") carry no usable signal."""
    adv = np.array(adv, np.float32).reshape(-1)
    bad = ~np.isfinite(adv)
    adv[bad] = 0.0
    return adv, int(bad.sum())


def masked_tokens(cfg: RunConfig, model: Model) -> tuple:
    """Generated tokens kept out of the loss (`rollout.eos_token`)."""
    rule = cfg.rollout.eos_token
    if rule == "mask" or (rule == "mask_if_pad" and model.pad_id == model.eos_id):
        return (model.eos_id,)
    return ()


def step_prompt_indices(seed: int, step: int, num_problems: int, count: int) -> np.ndarray:
    """The training problems of `step`: a pure function of (seed, step), the data position."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_problems, size=count, replace=count > num_problems)


__all__ = ["Generated", "Rollout", "Scored", "Scorer", "detokenize", "encode_prompts", "generate_rows",
           "finite_advantages", "rollout", "score_rows", "step_prompt_indices"]
