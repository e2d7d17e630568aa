"""The embedded arithmetic task: determinism, disjoint splits, correct chains, self-reward 1.0."""
import hashlib
import os
import re
import subprocess
import sys

import pytest

from arca_jax.tasks import arithmetic
from arca_jax.tasks import math as mr
from arca_jax.tasks.verify_pool import VerifyPool
from fixtures import REPO


def _digest(examples):
    h = hashlib.sha256()
    for ex in examples:
        h.update((ex.problem + "\x00" + ex.solution + "\x01").encode())
    return h.hexdigest()


def test_deterministic_in_process():
    assert arithmetic.generate("train", 300) == arithmetic.generate("train", 300)
    assert arithmetic.generate("test", 50) == arithmetic.generate("test", 100)[:50]
    assert arithmetic.generate("train", 100, seed=1) != arithmetic.generate("train", 100, seed=0)


def test_deterministic_across_hash_seeds():
    code = ("from arca_jax.tasks import arithmetic as a; import hashlib; h = hashlib.sha256(); "
            "[h.update((e.problem + '\\x00' + e.solution + '\\x01').encode()) "
            "for s in ('train', 'test') for e in a.generate(s, 200)]; print(h.hexdigest())")
    outs = set()
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=REPO)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip())
    expected = hashlib.sha256()
    for s in ("train", "test"):
        for e in arithmetic.generate(s, 200):
            expected.update((e.problem + "\x00" + e.solution + "\x01").encode())
    assert outs == {expected.hexdigest()}


def test_splits_are_disjoint_and_distinct():
    train = arithmetic.generate("train")
    test = arithmetic.generate("test")
    assert len(train) == arithmetic.DEFAULT_SIZES["train"] and len(test) == arithmetic.DEFAULT_SIZES["test"]
    train_texts, test_texts = {e.problem for e in train}, {e.problem for e in test}
    assert len(train_texts) == len(train) and len(test_texts) == len(test)
    assert not train_texts & test_texts
    # membership is a function of the text only: other seeds never leak test problems into train
    other = {e.problem for e in arithmetic.generate("train", 2000, seed=7)}
    assert not other & test_texts
    assert all(arithmetic.split_of(t) == "test" for t in test_texts)
    with pytest.raises(ValueError):
        arithmetic.generate("validation", 3)


def test_solutions_are_correct_chains():
    for ex in arithmetic.generate("train", 1000) + arithmetic.generate("test"):
        assert ex.problem == "What is %s?" % ex.expression
        assert re.fullmatch(r"[0-9+\-*()]+", ex.expression)
        body, boxed = ex.solution.rsplit(". ", 1)
        assert boxed == "\\boxed{%d}" % ex.answer
        chain = body.split(" = ")
        assert chain[0] == ex.expression and chain[-1] == str(ex.answer)
        assert len(chain) == ex.num_ops + 1  # one operation per step
        for step in chain:  # every rewrite keeps the value (our own digit/operator strings)
            assert eval(step, {"__builtins__": {}}) == ex.answer  # noqa: S307
        assert 2 <= ex.num_ops <= 4 and 0 <= ex.answer <= 99
        assert 14 <= len(ex.problem) <= 40 and 20 <= len(ex.solution) <= 100


def test_every_solution_scores_one_against_itself():
    examples = arithmetic.generate("train") + arithmetic.generate("test")
    sols = [e.solution for e in examples]
    assert mr.score_batch(sols, sols, mode="exact").rewards.all()
    off_by_one = ["\\boxed{%d}" % (e.answer + 1) for e in examples]
    assert not mr.score_batch(off_by_one, sols, mode="exact").rewards.any()


def test_verify_mode_on_arithmetic():
    examples = arithmetic.generate("test", 12)
    sols = [e.solution for e in examples]
    # "N.0" is not an exact match, so these reach math-verify
    comps = ["... \\boxed{%d.0}" % e.answer for e in examples] + ["\\boxed{%d.5}" % e.answer for e in examples]
    with VerifyPool(2) as pool:
        res = mr.score_batch(comps, sols + sols, mode="verify", pool=pool)
        assert mr.score_batch(sols, sols, mode="verify", pool=pool).rewards.all()
    assert res.rewards[:12].all() and not res.rewards[12:].any()
    assert res.timeouts == 0 and res.crashes == 0


def _chain_of(ex):
    """Expression and intermediate steps, read from the texts (not from ``ex.chain``)."""
    assert ex.problem.startswith("What is ") and ex.problem.endswith("?")
    steps = ex.solution.rsplit(". ", 1)[0].split(" = ")
    assert steps[0] == ex.problem[len("What is "):-1]
    return steps[:-1]  # the last step is the value


def test_test_split_unchanged_by_the_leak_filter():
    # digest of the whole default test split before the train filter was added
    assert _digest(arithmetic.generate("test")) == \
        "d83681bf973a8e4bbabc9db3228c2ddab02bbd677516d007ff2c15c7d2e282c8"
    assert arithmetic.generate("test", held_out=0) == arithmetic.generate("test")


@pytest.mark.parametrize("n", [arithmetic.DEFAULT_SIZES["train"], 20000])  # 20000: pretrain_tiny's size
def test_no_test_expression_or_step_in_train(n):
    test = arithmetic.generate("test")  # the whole test split (evaluation uses a prefix of it)
    held_out = {s for ex in test for s in _chain_of(ex)}
    assert {ex.expression for ex in test} <= held_out and len(held_out) > len(test)
    train = arithmetic.generate("train", n)
    assert len(train) == n and len({ex.problem for ex in train}) == n
    for ex in train:
        assert held_out.isdisjoint(_chain_of(ex)), ex.solution
        assert ex.expression not in held_out
    assert arithmetic.held_out_expressions() == held_out


def test_train_filter_is_the_unfiltered_stream_minus_leaks():
    held_out = arithmetic.held_out_expressions()
    raw = arithmetic.generate("train", 8000, held_out=0)  # the stream before the filter
    kept = [ex for ex in raw if held_out.isdisjoint(_chain_of(ex))]
    train = arithmetic.generate("train")
    assert train == kept[:len(train)]
    # the default 5000 are the first 7938 unfiltered train problems less 2938 leaking ones
    assert raw.index(train[-1]) + 1 - len(train) == 2938
    assert arithmetic.generate("train", 100) == train[:100]  # still prefixes
    # other seeds and options filter against their own test split
    t7 = arithmetic.held_out_expressions(seed=7)
    assert all(t7.isdisjoint(_chain_of(ex)) for ex in arithmetic.generate("train", 500, seed=7))
    small = arithmetic.generate("train", 300, max_ops=2)
    t_small = arithmetic.held_out_expressions(max_ops=2)
    assert all(t_small.isdisjoint(_chain_of(ex)) for ex in small)
    # options with fewer than 500 distinct test problems: the filter uses those it finds
    tiny = arithmetic.generate("train", 5, lo=1, hi=2, max_ops=2)
    t_tiny = {s for ex in arithmetic.generate("test", 3, lo=1, hi=2, max_ops=2) for s in _chain_of(ex)}
    assert len(tiny) == 5 and all(t_tiny.isdisjoint(_chain_of(ex)) for ex in tiny)
    with pytest.raises(ValueError, match="held_out"):
        arithmetic.generate("train", 5, held_out=-1)
