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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
