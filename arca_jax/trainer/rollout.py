"""Rollouts: prompts -> completions -> rewards -> advantages -> the training `Batch`.

One code path for every layout: one device, pmap (which splits batches itself) and a mesh over
one or several processes (`parallel.RowLayout`). Every process holds the same prompt array; the
sampler runs as one SPMD program (on a mesh each process's devices generate its own rows, with
the weights as the train step holds them; the sampler's random numbers do not depend on the
sharding, so the completions equal a single-device run's). Each process decodes and scores only
the rows it owns; rewards (a float per row) are all-gathered, so every process computes the same
advantages.

DAPO's additions (arXiv 2503.14476; settings in `config.RolloutConfig`): dynamic sampling drops
the groups whose task rewards are all equal and samples further rounds of prompts until the batch
is full of groups with mixed rewards (``select_groups``; the decision reads only the all-gathered
rewards, so every process takes the same one and runs the same number of rounds); the soft
overlong punishment is added to the rewards the advantages read (``overlong_penalty``); overlong
filtering keeps truncated completions out of the loss (``mask_rows``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import distributed, parallel, sampling
from arca_jax import replicas as replicas_lib
from arca_jax.batch import Batch, build_batch
from arca_jax.config import RunConfig
from arca_jax.grpo.objective import advantages
from arca_jax.prompts import bucket_prompts
from arca_jax.trainer.setup import Model, sampler_options


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


def generate_rows(model: Model, mesh, ids: np.ndarray, mask: np.ndarray, *, group_size: int = 1,
                  shrink: Optional[int] = None, replicas: Optional[int] = None,
                  sample_mesh=None, **gen) -> Generated:
    """Samples `group_size` (G) completions of each of the prompts [n, P] (the same host arrays on
    every process) on `mesh` (None: the default device): rows r G .. r G + G - 1 are prompt r's,
    padded to a multiple of the devices holding different rows; each process's devices decode
    their own slots (with `max_batch`, a row waiting for a slot takes whichever frees first; the
    outputs are replicated), and each prompt is prefilled once for its G rows
    (`sampling.generate`'s `group_size`) whenever the padded rows split into whole groups.
    `gen`: `sampling.generate` keywords; a `max_batch` is rounded up to whole groups spread
    evenly over the devices. shrink, replicas: `RolloutConfig`'s (None: the platform's default,
    `sampling.resolve_shrink`, `replicas.resolve`); without a mesh, `replicas` devices sample
    at once, each its own share of the groups. sample_mesh: another layout of `mesh`'s devices
    to sample on (`setup.rollout_mesh`; None: `mesh`); the completions come back on `mesh`'s
    rows."""
    G = int(group_size)
    ids, mask = np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0)
    layout = parallel.RowLayout.padded(mesh, ids.shape[0])
    g_ids, g_mask = layout.to_global(ids), layout.to_global(mask)
    # padding repeats the last row (the last prompt): aligned groups of G rows still share one
    shared = G if layout.batch_size % G == 0 else 1
    sampler = mesh if sample_mesh is None else sample_mesh
    if gen.get("max_batch") is not None:  # slots: whole groups, split evenly over the devices
        unit = int(np.lcm(shared, parallel.row_devices(sampler)))
        gen["max_batch"] = -(-int(gen["max_batch"]) // unit) * unit
    out = sampling.generate(model.params, g_ids, g_mask, config=model.config, eos_id=model.eos_id,
                            pad_id=model.pad_id, mesh=sampler, group_size=shared,
                            shrink=sampling.resolve_shrink(shrink),
                            devices=None if mesh is not None else replicas_lib.devices(
                                replicas, layout.batch_size, gen.get("max_batch")),
                            **gen)
    if sampler is not mesh:
        out = layout.place(out)
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
    """One step's rollout: the batch to train on and what the step logs.

    rewards, problems: the task's rewards [P, G] (before the overlong penalty) and the problems
    [P] of the batch's groups, in batch order. sampled_rewards [Q, G]: the task's rewards of
    every group sampled this step (Q = P without dynamic sampling; all rounds with it).
    """

    batch: Batch  # global [P * G, T], advantages set
    rewards: np.ndarray  # [P, G]
    num_tokens: int  # completion tokens generated (every round)
    slot_steps: int  # decode slot-steps spent (every round; `slot_steps`)
    time_sample_s: float
    time_score_s: float
    num_truncated: int = 0  # completions cut at max_new_tokens (never ended), in the batch
    num_empty: int = 0  # completions that are only EOS: their text is "", scored as such
    num_invalid_advantages: int = 0  # non-finite advantages (overflowing rewards), set to 0
    problems: Sequence[Any] = ()
    sampled_rewards: Optional[np.ndarray] = None  # [Q, G]
    groups_dropped: int = 0  # all-equal groups sampled and left out of the batch
    resample_rounds: int = 0  # extra sampling rounds of dynamic sampling
    groups_zero_kept: int = 0  # all-equal groups in the batch (the bound was hit)
    overlong_penalised: int = 0  # completions of the batch with a penalty < 0
    overlong_penalty_mean: float = 0.0  # mean penalty per completion of the batch (<= 0)
    truncated_masked: int = 0  # truncated completions kept out of the loss


class RoundRows(NamedTuple):
    """The rows of one sampling round, Q prompts x G completions (prompt-major), as host arrays
    that every process holds in full (the dynamic-sampling path assembles its batch from them).
    W: the round's prompt width, N = max_new_tokens."""

    problems: Sequence[Any]  # [Q]
    prompt_ids: np.ndarray  # [Q * G, W] int32, left-padded
    prompt_mask: np.ndarray  # [Q * G, W] int32
    tokens: np.ndarray  # [Q * G, N] int32
    mask: np.ndarray  # [Q * G, N] int32
    logps: np.ndarray  # [Q * G, N] float32
    sampled_logps: Optional[np.ndarray]  # [Q * G, N] float32
    scored: Scored  # rewards, lengths, finished [Q * G]
    slot_steps: int = 0  # decode slot-steps of the round (`slot_steps`)


class GroupSelection(NamedTuple):
    """Which sampled groups make the batch (``select_groups``).

    groups: [P] int64 indices into the groups in draw order (every round's, concatenated),
        ascending. dropped: all-equal groups left out. zero_kept: all-equal groups in the batch.
    """

    groups: np.ndarray
    dropped: int
    zero_kept: int


def equal_reward_groups(rewards) -> np.ndarray:
    """[Q] bool: the groups ([Q, G] rewards) whose rewards are all equal, whose advantages are
    therefore all 0 under every estimator."""
    r = np.asarray(rewards)
    return np.all(r == r[:, :1], axis=1)


def select_groups(rewards, count: int) -> GroupSelection:
    """DAPO's dynamic sampling over groups in draw order ([Q, G] rewards): the first `count`
    groups with mixed rewards; when fewer exist, the earliest all-equal groups fill the rest
    (Q >= count). The batch keeps draw order."""
    equal = equal_reward_groups(rewards)
    Q = equal.shape[0]
    if Q < count:
        raise ValueError(f"{Q} groups cannot fill a batch of {count}")
    mixed = np.flatnonzero(~equal)[:count]
    fill = np.flatnonzero(equal)[:count - len(mixed)]
    groups = np.sort(np.concatenate([mixed, fill]))
    return GroupSelection(groups.astype(np.int64), int(equal.sum()) - len(fill), len(fill))


def overlong_penalty(lengths, max_tokens: int, buffer: int, scale: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment [n] float32 of completions of `lengths` [n] tokens:
    scale * min(0, max(-1, (L_max - L_cache - |y|) / L_cache)) with L_max = `max_tokens`,
    L_cache = `buffer` (0 for |y| <= L_max - L_cache, linear inside the buffer, -scale from
    L_max on). buffer 0: no penalty."""
    y = np.asarray(lengths, np.float64)
    if buffer == 0:
        return np.zeros(y.shape, np.float32)
    return (scale * np.clip((max_tokens - buffer - y) / buffer, -1.0, 0.0)).astype(np.float32)


def mask_rows(batch: Batch, keep) -> Batch:
    """`batch` with the rows where `keep` [B] is False out of the loss: their completion_mask and
    the sampler's log-probs set to 0 (still attended to; their advantage unchanged)."""
    k = jnp.asarray(keep).astype(bool)[:, None]
    zero = lambda x: None if x is None else jnp.where(k, x, jnp.zeros((), x.dtype))  # noqa: E731
    return batch.replace(completion_mask=zero(batch.completion_mask),
                         sample_logps=zero(batch.sample_logps),
                         behaviour_logps=zero(batch.behaviour_logps))


def _sample_round(model: Model, mesh, problems: Sequence[Any], cfg: RunConfig, *, adapter,
                  key: jax.Array, score: Scorer, beat):
    """Samples and scores G completions of each problem: (prompt ids [Q, W], mask, Generated,
    Scored, seconds sampling, seconds scoring)."""
    G, r = cfg.rollout.group_size, cfg.rollout
    t0 = time.time()
    ids, mask = bucket_prompts(*encode_prompts(model.tokenizer, [p.prompt for p in problems],
                                               r.max_prompt_tokens, model.pad_id,
                                               r.prompt_truncation),
                               max_tokens=r.max_prompt_tokens, pad_id=model.pad_id)
    gen = generate_rows(model, mesh, ids, mask, group_size=G, rng=key, max_batch=r.max_batch,
                        shrink=r.shrink, replicas=r.replicas, max_new_tokens=r.max_new_tokens,
                        lora=adapter, lora_scale=cfg.lora.scaling, temperature=r.temperature,
                        top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                        **sampler_options(cfg, model, mesh))
    jax.block_until_ready(gen.out.tokens)
    t1 = time.time()
    beat("sampling")
    scored = score_rows(gen, len(problems) * G, lambda i: problems[i // G], score,
                        model.tokenizer)
    return ids, mask, gen, scored, t1 - t0, time.time() - t1


def slot_steps(gen: Generated) -> int:
    """Decode slot-steps of a generation (`SampleOutput.slot_steps`: padding rows included); the
    completion tokens over this are the fraction of slot-steps that did useful work (in one
    batch, rows that ended early idle until the longest row ends; with `rollout.max_batch`, a
    free slot takes the next waiting row)."""
    return int(gen.out.slot_steps)


def round_rows(gen: Generated, problems: Sequence[Any], ids, mask, scored: Scored,
               G: int) -> RoundRows:
    """The round's rows on every process's host (one all-gather with several processes)."""
    n = len(problems) * G
    lay, out = gen.layout, gen.out
    arrays = {"tokens": out.tokens, "mask": out.mask, "logps": out.logps}
    if out.sampled_logps is not None:
        arrays["sampled_logps"] = out.sampled_logps
    got = lay.combine({k: lay.host(v) for k, v in arrays.items()})
    return RoundRows(problems=list(problems), prompt_ids=np.repeat(ids, G, axis=0),
                     prompt_mask=np.repeat(mask, G, axis=0),
                     tokens=got["tokens"][:n], mask=got["mask"][:n], logps=got["logps"][:n],
                     sampled_logps=got["sampled_logps"][:n] if "sampled_logps" in got else None,
                     scored=scored, slot_steps=slot_steps(gen))


def assemble_rows(rounds: Sequence[RoundRows], groups, G: int, pad_id: int) -> RoundRows:
    """The rows of `groups` (indices into the rounds' groups in draw order) as one RoundRows,
    prompts left-padded to the widest round's width."""
    width = max(r.prompt_ids.shape[1] for r in rounds)

    def widen(x, fill):
        return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)

    def cat(get):
        return np.concatenate([get(r) for r in rounds])

    rows = (np.asarray(groups)[:, None] * G + np.arange(G)[None, :]).reshape(-1)
    problems = [p for r in rounds for p in r.problems]
    with_sampled = all(r.sampled_logps is not None for r in rounds)
    return RoundRows(
        problems=[problems[i] for i in groups],
        prompt_ids=cat(lambda r: widen(r.prompt_ids, pad_id))[rows],
        prompt_mask=cat(lambda r: widen(r.prompt_mask, 0))[rows],
        tokens=cat(lambda r: r.tokens)[rows], mask=cat(lambda r: r.mask)[rows],
        logps=cat(lambda r: r.logps)[rows],
        sampled_logps=cat(lambda r: r.sampled_logps)[rows] if with_sampled else None,
        scored=Scored(*(cat(lambda r, i=i: r.scored[i])[rows] for i in range(3))),
        slot_steps=sum(r.slot_steps for r in rounds))


def _dynamic_rounds(model: Model, mesh, problems, cfg: RunConfig, first: RoundRows, *, adapter,
                    key, score: Scorer, beat, draw):
    """Rounds of sampling until `prompts_per_step` groups have mixed rewards or
    `max_resample_rounds` extra rounds are spent: (rounds, seconds sampling, seconds scoring).
    Round k >= 1 samples `draw(k)` with key fold_in(key, k); every process decides alike (the
    rewards are all-gathered)."""
    P, G, r = len(problems), cfg.rollout.group_size, cfg.rollout
    rounds, t_sample, t_score = [first], 0.0, 0.0
    while (sum(int((~equal_reward_groups(x.scored.rewards.reshape(-1, G))).sum())
               for x in rounds) < P and len(rounds) <= r.max_resample_rounds):
        k = len(rounds)
        more = list(draw(k))
        if len(more) != P:
            raise ValueError(f"draw({k}) gave {len(more)} problems, expected {P}")
        ids, mask, gen, scored, ts, tc = _sample_round(model, mesh, more, cfg, adapter=adapter,
                                                       key=jax.random.fold_in(key, k),
                                                       score=score, beat=beat)
        rounds.append(round_rows(gen, more, ids, mask, scored, G))
        t_sample, t_score = t_sample + ts, t_score + tc
    return rounds, t_sample, t_score


def rollout(model: Model, mesh, layout: parallel.RowLayout, problems: Sequence[Any], cfg: RunConfig,
            *, adapter, key: jax.Array, score: Scorer,
            beat: Callable[[str], None] = lambda what: None,
            draw: Optional[Callable[[int], Sequence[Any]]] = None) -> Rollout:
    """Samples `rollout.group_size` completions of each problem with `adapter`, scores them and
    builds the batch with group advantages (`grpo.estimator`). `layout` is the train step's
    row layout of the P * G rows.

    With `rollout.dynamic_sampling`, groups whose task rewards are all equal are replaced by
    groups of `draw(k)` (P further problems for extra round k = 1, 2, ...; required then),
    sampled with key fold_in(key, k) (``select_groups``). The overlong penalty
    (`rollout.overlong_buffer`) is added to the rewards the advantages read; with
    `rollout.overlong_filtering` truncated completions are kept out of the loss (``mask_rows``).
    """
    P, G, r = len(problems), cfg.rollout.group_size, cfg.rollout
    ids, mask, gen, scored, t_sample, t_score = _sample_round(
        model, mesh, problems, cfg, adapter=adapter, key=key, score=score, beat=beat)
    num_tokens = int(scored.lengths.sum())
    steps = slot_steps(gen)
    sampled = scored.rewards.reshape(P, G)
    dropped = resampled = zero_kept = 0
    if r.dynamic_sampling:
        if draw is None:
            raise ValueError("rollout.dynamic_sampling needs `draw` (the problems of extra rounds)")
        rounds, ts, tc = _dynamic_rounds(model, mesh, problems, cfg,
                                         round_rows(gen, problems, ids, mask, scored, G),
                                         adapter=adapter, key=key, score=score, beat=beat,
                                         draw=draw)
        t_sample, t_score = t_sample + ts, t_score + tc
        num_tokens = sum(int(x.scored.lengths.sum()) for x in rounds)
        steps = sum(x.slot_steps for x in rounds)
        sampled = np.concatenate([x.scored.rewards.reshape(-1, G) for x in rounds])
        sel = select_groups(sampled, P)
        dropped, resampled, zero_kept = sel.dropped, len(rounds) - 1, sel.zero_kept
        rows = assemble_rows(rounds, sel.groups, G, model.pad_id)
        problems, scored = rows.problems, rows.scored
    rewards = scored.rewards.reshape(P, G)
    penalty = overlong_penalty(scored.lengths, r.max_new_tokens, r.overlong_buffer,
                               r.overlong_penalty)
    adv, bad_adv = finite_advantages(advantages(rewards + penalty.reshape(P, G),
                                                cfg.grpo.estimator, eps=1e-6))
    if r.dynamic_sampling:
        to = layout.to_global
        out = sampling.SampleOutput(
            tokens=to(rows.tokens), mask=to(rows.mask), logps=to(rows.logps),
            lengths=to(rows.scored.lengths.astype(np.int32)), finished=to(rows.scored.finished),
            num_steps=jnp.asarray(rows.tokens.shape[1], jnp.int32),
            sampled_logps=None if rows.sampled_logps is None else to(rows.sampled_logps))
        batch = build_batch(to(rows.prompt_ids), to(rows.prompt_mask), out,
                                     advantages=to(adv), mask_tokens=masked_tokens(cfg, model))
    else:
        batch = build_batch(gen.ids, gen.mask, gen.out, advantages=layout.to_global(adv),
                                     mask_tokens=masked_tokens(cfg, model))
    truncated = ~scored.finished
    if r.overlong_filtering:
        batch = mask_rows(batch, layout.to_global(scored.finished))
    beat("scoring")
    return Rollout(batch=batch, rewards=rewards, num_tokens=num_tokens, slot_steps=steps,
                   time_sample_s=t_sample, time_score_s=t_score,
                   num_truncated=int(truncated.sum()),
                   num_empty=int((scored.finished & (scored.lengths <= 1)).sum()),
                   num_invalid_advantages=bad_adv, problems=list(problems),
                   sampled_rewards=sampled, groups_dropped=dropped, resample_rounds=resampled,
                   groups_zero_kept=zero_kept, overlong_penalised=int((penalty < 0).sum()),
                   overlong_penalty_mean=float(penalty.mean()),
                   truncated_masked=int(truncated.sum()) if r.overlong_filtering else 0)


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


def step_prompt_indices(seed: int, step: int, num_problems: int, count: int,
                        round: int = 0) -> np.ndarray:
    """The training problems of `step`: a pure function of (seed, step), the data position.
    `round` k >= 1: the problems of dynamic sampling's extra round k, an independent draw of
    (seed, step, k) (round 0 is the step's own draw)."""
    rng = np.random.default_rng([seed, step] if round == 0 else [seed, step, round])
    return rng.choice(num_problems, size=count, replace=count > num_problems)


__all__ = ["Generated", "GroupSelection", "Rollout", "RoundRows", "Scored", "Scorer",
           "assemble_rows", "detokenize", "encode_prompts", "equal_reward_groups",
           "finite_advantages", "generate_rows", "mask_rows", "overlong_penalty", "rollout",
           "round_rows", "score_rows", "select_groups", "slot_steps", "step_prompt_indices"]
