"""DAPO's rollout settings (Yu et al. 2025, arXiv 2503.14476) against transcriptions of the paper:

- the soft overlong punishment (eq. 13): 0 up to L_max - L_cache tokens, (L_max - L_cache - |y|)
  / L_cache inside the buffer, -1 beyond, scaled and added to the reward;
- dynamic sampling (eq. 11, "0 < |{o_i : is_equivalent(a, o_i)}| < G"): groups whose rewards
  are all equal are dropped and the batch is topped up from further prompts; brute force over
  random reward tables for the selection, and on the tiny model a rollout against a reference
  assembled from the sampler's own rounds (one device and an 8-device mesh);
- overlong filtering: truncated completions out of the loss.
"""

import dataclasses
import importlib

import jax
import numpy as np
import pytest

from arca_jax import config, parallel
from arca_jax.trainer import setup

rollout_mod = importlib.import_module("arca_jax.trainer.rollout")  # the package exports rollout()

BASE = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=32",
        "rollout.max_prompt_tokens=15", "task.max_train_samples=32"]


# ------------------------------------ transcriptions ------------------------------------------


def paper_overlong(y: int, l_max: int, l_cache: int) -> float:
    """DAPO eq. 13, R_length(y), as printed."""
    if y <= l_max - l_cache:
        return 0.0
    if l_max - l_cache < y <= l_max:
        return ((l_max - l_cache) - y) / l_cache
    return -1.0


def brute_force_selection(rewards, count):
    """Walk the groups in draw order: keep a group whose rewards are not all equal until `count`
    are kept; then, if short, the earliest all-equal groups."""
    kept, equal = [], []
    for q, row in enumerate(rewards):
        if len(set(row.tolist())) > 1:
            if len(kept) < count:
                kept.append(q)
        else:
            equal.append(q)
    fill = equal[:count - len(kept)]
    return sorted(kept + fill), len(equal) - len(fill), len(fill)


def np_grpo_advantages(r):
    """(r - mean) / max(std_unbiased, 1e-6) per group, in float64."""
    r = np.asarray(r, np.float64)
    return (r - r.mean(1, keepdims=True)) / np.maximum(r.std(1, ddof=1, keepdims=True), 1e-6)


def test_overlong_penalty_is_the_papers():
    lengths = np.arange(0, 40)
    for l_max, l_cache, scale in ((32, 8, 1.0), (32, 1, 0.5), (20, 20, 2.0), (16, 4, 0.0)):
        want = np.asarray([scale * paper_overlong(int(y), l_max, l_cache) for y in lengths])
        got = rollout_mod.overlong_penalty(lengths, l_max, l_cache, scale)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not rollout_mod.overlong_penalty(lengths, 32, 0, 1.0).any()  # buffer 0: off


def test_group_selection_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        Q, G = int(rng.integers(1, 12)), int(rng.integers(2, 5))
        count = int(rng.integers(1, Q + 1))
        rewards = rng.integers(0, 2, (Q, G)).astype(np.float32)
        if trial % 3 == 0:  # some groups of other equal values
            rewards[rng.random(Q) < 0.3] = 0.5
        sel = rollout_mod.select_groups(rewards, count)
        groups, dropped, zero_kept = brute_force_selection(rewards, count)
        assert sel.groups.tolist() == groups and (sel.dropped, sel.zero_kept) == (dropped,
                                                                                  zero_kept)
    with pytest.raises(ValueError, match="cannot fill"):
        rollout_mod.select_groups(np.zeros((1, 2)), 2)


def test_extra_rounds_draw_from_the_seeded_stream():
    base = rollout_mod.step_prompt_indices(3, 5, 100, 4)
    assert base.tolist() == np.random.default_rng([3, 5]).choice(100, 4, replace=False).tolist()
    r1 = rollout_mod.step_prompt_indices(3, 5, 100, 4, round=1)
    assert r1.tolist() == rollout_mod.step_prompt_indices(3, 5, 100, 4, round=1).tolist()
    assert r1.tolist() != base.tolist() != rollout_mod.step_prompt_indices(3, 5, 100, 4, round=2).tolist()


def test_settings_are_validated():
    for bad, msg in ((["rollout.max_resample_rounds=-1"], "max_resample_rounds"),
                     (["rollout.overlong_buffer=33"], "overlong_buffer"),
                     (["rollout.overlong_penalty=-1"], "overlong_penalty"),
                     (["grpo.estimator=dr_grpo", "rollout.group_size=1",
                       "rollout.dynamic_sampling=true"], "group_size")):
        with pytest.raises(config.ConfigError, match=msg):
            config.load(None, BASE + bad)


# ------------------------------------ rollouts on the tiny model ------------------------------


class _Problem:
    def __init__(self, prompt: str, kind: str):
        self.prompt, self.kind = prompt, kind


class _Res:
    def __init__(self, rewards):
        self.rewards, self.timeouts = rewards, 0


class _KindTask:
    """Rewards by problem kind: "equal" scores 1 for every completion; "mixed" scores 0, 1, 0, 1
    over a problem's completions in the order scored (a group of G >= 2 always mixed)."""

    def score_batch(self, completions, problems, timeout_s=None):
        seen, out = {}, []
        for p in problems:
            n = seen.get(id(p), 0)
            seen[id(p)] = n + 1
            out.append(1.0 if p.kind == "equal" else float(n % 2))
        return _Res(out)


# the arithmetic task's format; the tiny model needs about 25-35 tokens for these
PROMPTS = ["What is 3+4?\n", "What is 2*(3+4)-6?\n", "What is (7+1)*3?\n", "What is 9*9-1?\n",
           "What is 12-5*2?\n", "What is 8/4?\n"]


def _problems(kinds, offset=0):
    return [_Problem(PROMPTS[(offset + i) % len(PROMPTS)], k) for i, k in enumerate(kinds)]


@pytest.fixture(scope="module")
def models():
    """The embedded model on the default device and on an 8-device mesh (rows over "data")."""
    cfg = config.load(None, BASE)
    mesh_cfg = config.load(None, BASE + ["train.mode=mesh"])
    mesh = setup.make_run_mesh(mesh_cfg)
    return {"jit": (setup.load_model(cfg), None), "mesh": (setup.load_model(mesh_cfg, mesh), mesh)}


def _rollout(models, mode, overrides, rounds, key=jax.random.PRNGKey(7)):
    cfg = config.load(None, BASE + overrides)
    model, mesh = models[mode]
    layout = parallel.RowLayout(mesh, cfg.batch_size)
    score = rollout_mod.Scorer(_KindTask(), 1.0)
    return rollout_mod.rollout(model, mesh, layout, rounds[0], cfg, adapter=None, key=key,
                               score=score, draw=lambda k: rounds[k]), cfg, model


def _host(batch):
    return jax.tree_util.tree_map(lambda x: None if x is None else np.asarray(x), batch)


def _reference_batch(model, cfg, rounds, picks, key, penalty_fn=None):
    """The batch the paper's procedure gives, assembled by hand from the sampler's own rounds:
    round k sampled alone (key fold_in(key, k), k >= 1) on the default device; the picked
    (round, group) pairs' rows, prompts left-padded to the widest round; GRPO advantages of
    the task rewards plus the penalty."""
    r, G = cfg.rollout, cfg.rollout.group_size
    outs = []
    for k, probs in enumerate(rounds[:1 + max(k for k, _ in picks)]):
        ids, mask = rollout_mod.encode_prompts(model.tokenizer, [p.prompt for p in probs],
                                               r.max_prompt_tokens, model.pad_id)
        g = rollout_mod.generate_rows(model, None, np.repeat(ids, G, 0), np.repeat(mask, G, 0),
                                      rng=key if k == 0 else jax.random.fold_in(key, k),
                                      max_new_tokens=r.max_new_tokens, lora=None,
                                      temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        outs.append((np.asarray(g.ids), np.asarray(g.mask), _host(g.out), probs))
    width = max(o[0].shape[1] for o in outs)
    ids, am, cm, rewards, lengths, finished = [], [], [], [], [], []
    for k, q in picks:
        pid, pm, out, probs = outs[k]
        for j in range(q * G, (q + 1) * G):
            pad = width - pid.shape[1]
            ids.append([model.pad_id] * pad + pid[j].tolist() + out.tokens[j].tolist())
            am.append([0] * pad + pm[j].tolist() + out.mask[j].tolist())
            cm.append([0] * (pad + pid.shape[1]) + out.mask[j].tolist())
            lengths.append(int(out.mask[j].sum()))
            finished.append(bool(out.finished[j]))
        rewards.append(_KindTask().score_batch([""] * G, [probs[q]] * G).rewards)
    rewards = np.asarray(rewards, np.float64)
    pen = np.zeros(len(lengths)) if penalty_fn is None else np.asarray([penalty_fn(y) for y in lengths])
    adv = np_grpo_advantages(rewards + pen.reshape(rewards.shape)).reshape(-1)
    return (np.asarray(ids), np.asarray(am), np.asarray(cm), adv, rewards, np.asarray(lengths),
            np.asarray(finished))


@pytest.mark.parametrize("mode", ["jit", "mesh"])
def test_dynamic_sampling_tops_up_from_further_prompts(models, mode):
    """Round 0: one all-equal group, one mixed; round 1: mixed, then all-equal. The batch is
    round 0's mixed group and round 1's first group; both all-equal groups are dropped."""
    key = jax.random.PRNGKey(7)
    rounds = [_problems(["equal", "mixed"]), _problems(["mixed", "equal"], 2),
              _problems(["mixed", "mixed"], 4)]
    ro, cfg, model = _rollout(models, mode, ["rollout.dynamic_sampling=true"], rounds, key)
    ids, am, cm, adv, rewards, lengths, finished = _reference_batch(model, cfg, rounds,
                                                                    [(0, 1), (1, 0)], key)
    b = _host(ro.batch)
    np.testing.assert_array_equal(b.input_ids, ids)
    np.testing.assert_array_equal(b.attention_mask, am)
    np.testing.assert_array_equal(b.completion_mask, cm)
    np.testing.assert_allclose(b.advantages, adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ro.rewards, rewards)
    assert [p.prompt for p in ro.problems] == [rounds[0][1].prompt, rounds[1][0].prompt]
    assert (ro.groups_dropped, ro.resample_rounds, ro.groups_zero_kept) == (2, 1, 0)
    # every completion sampled, for the logged reward mean: two rounds of 2 groups
    assert ro.sampled_rewards.shape == (4, 4) and ro.sampled_rewards[0].tolist() == [1.0] * 4
    assert ro.num_tokens > int(lengths.sum())  # the dropped groups' tokens were generated too
    assert np.all(b.behaviour_logps[cm == 0] == 0) and np.any(b.behaviour_logps[cm == 1] != 0)


@pytest.mark.parametrize("mode", ["jit", "mesh"])
def test_bound_hit_fills_with_the_earliest_equal_groups(models, mode):
    rounds = [_problems(["equal", "equal"]), _problems(["equal", "mixed"], 2)]
    ro, cfg, model = _rollout(models, mode, ["rollout.dynamic_sampling=true",
                                             "rollout.max_resample_rounds=1"], rounds)
    # groups in draw order: r0g0, r0g1 (equal), r1g0 (equal), r1g1 (mixed): keep r1g1, fill r0g0
    ids, am, cm, adv, *_ = _reference_batch(model, cfg, rounds, [(0, 0), (1, 1)],
                                            jax.random.PRNGKey(7))
    b = _host(ro.batch)
    np.testing.assert_array_equal(b.input_ids, ids)
    np.testing.assert_array_equal(b.completion_mask, cm)
    np.testing.assert_allclose(b.advantages, adv, atol=1e-6)
    assert not b.advantages[:4].any()  # the filling group carries no advantage
    assert (ro.groups_dropped, ro.resample_rounds, ro.groups_zero_kept) == (2, 1, 1)


def test_mixed_first_round_gives_the_plain_batch(models):
    """When round 0 has only mixed groups, dynamic sampling samples nothing more and its batch
    is the plain rollout's, array for array."""
    rounds = [_problems(["mixed", "mixed"])]
    dyn, _, _ = _rollout(models, "jit", ["rollout.dynamic_sampling=true"], rounds)
    plain, _, _ = _rollout(models, "jit", [], rounds)
    a, b = _host(dyn.batch), _host(plain.batch)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f.name)
    assert dyn.resample_rounds == dyn.groups_dropped == 0


@pytest.mark.parametrize("mode", ["jit", "mesh"])
def test_overlong_shaping_and_filtering(models, mode):
    """The penalty enters the advantages (task rewards as logged); truncated completions leave
    the loss (completion_mask 0), still counted in their group's advantages."""
    rounds = [_problems(["mixed", "equal"])]
    ro, cfg, model = _rollout(models, mode, ["rollout.overlong_buffer=12",
                                             "rollout.overlong_penalty=0.5",
                                             "rollout.overlong_filtering=true"], rounds)
    ids, am, cm, adv, rewards, lengths, finished = _reference_batch(
        model, cfg, rounds, [(0, 0), (0, 1)], jax.random.PRNGKey(7),
        penalty_fn=lambda y: 0.5 * paper_overlong(y, 32, 12))
    b = _host(ro.batch)
    np.testing.assert_array_equal(b.input_ids, ids)
    np.testing.assert_array_equal(b.completion_mask, cm * finished[:, None])
    np.testing.assert_allclose(b.advantages, adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ro.rewards, rewards)  # logged: the task's rewards
    assert np.all(b.sample_logps[~finished] == 0)
    pen = np.asarray([0.5 * paper_overlong(int(y), 32, 12) for y in lengths])
    assert ro.overlong_penalised == int((pen < 0).sum()) > 0
    np.testing.assert_allclose(ro.overlong_penalty_mean, pen.mean(), rtol=1e-6)
    assert ro.truncated_masked == ro.num_truncated == int((~finished).sum())
    assert 0 < ro.truncated_masked < len(finished)  # both kinds of rows are exercised
