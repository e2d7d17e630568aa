"""MATH reward: boxed extraction, the paper's light normalisation, exact and math-verify rewards,
and hostile completions under a time bound."""
import threading
import time

import numpy as np
import pytest

from arca_jax.tasks import math as mr
from arca_jax.tasks.verify_pool import VerifyPool
from fixtures import FINISHES_S


@pytest.fixture(scope="module")
def pool():
    p = VerifyPool(2)
    yield p
    p.close()


# ----------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
    (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
    (r"\boxed{1} and \fbox{2}", "2"),
    (r"\fbox{2} and \boxed{1}", "1"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed 42 apples", "42"),
    (r"\boxed {5}", "5"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{x \} y}", r"x \} y"),
    (r"\boxed{1} then \boxedfoo{3}", "1"),
    (r"\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert mr.extract_boxed(text) == expected


@pytest.mark.parametrize("text", [
    "no box here, the answer is 5",
    r"\boxed{\frac{1}{2}",            # unbalanced
    r"\boxed{1} and later \boxed{2",  # the last box is unbalanced (truncated generation)
    r"\boxed",
    r"\boxed   ",
    r"\boxedfoo{3}",
    "",
    None,
    b"\\boxed{1}",
])
def test_extract_boxed_none(text):
    assert mr.extract_boxed(text) is None


@pytest.mark.parametrize("raw, expected", [
    (r"\left( 1, 2 \right)", "( 1, 2 )"),
    (r"\text{(C)}", "(C)"),
    (r"5\text{ cm}", "5 cm"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac12", r"\frac12"),
    (r"3,\!000", "3,000"),
    (r"a\,b\;c", "abc"),
    ("  x  +\n 1 . ", "x + 1"),
    ("7.", "7"),
    (r"x \leftarrow y", r"x \leftarrow y"),
    (r"\textbf{A}", r"\textbf{A}"),
    (r"\text{\text{a}}", "a"),
])
def test_normalize_answer(raw, expected):
    assert mr.normalize_answer(raw) == expected


# ----------------------------------------------------------------------------------- exact mode
SOL = r"We compute ... so the answer is $\boxed{\dfrac{1}{2}}$."


@pytest.mark.parametrize("completion, expected", [
    (r"Thus \boxed{\frac{1}{2}}.", 1.0),
    (r"Thus \boxed{\dfrac{1}{2}}", 1.0),
    (r"Thus \boxed{ \frac{1}{2} .}", 1.0),
    (r"I first thought \boxed{\frac{1}{2}} but it is \boxed{\frac{1}{3}}", 0.0),  # last box counts
    (r"The answer is \frac{1}{2}.", 0.0),  # no box: 0 whatever it says
    (r"\boxed{0.5}", 0.0),  # equivalent, but not an exact match
    (r"\boxed{\frac{1}{2}", 0.0),  # unbalanced
    (r"\boxed{}", 0.0),
])
def test_reward_exact(completion, expected):
    assert mr.reward(completion, SOL, mode="exact") == expected


def test_reward_exact_normalisation_cases():
    assert mr.reward(r"\boxed{3,\!000}", r"\boxed{3,000}") == 1.0
    assert mr.reward(r"\boxed{\left(1,2\right)}", r"\boxed{(1,2)}") == 1.0
    assert mr.reward(r"\boxed{\text{(C)}}", r"\boxed{(C)}") == 1.0
    assert mr.reward(r"\boxed{1-1/e}", r"\boxed{1+1/e}") == 0.0
    assert mr.reward(r"\boxed 5", r"\boxed{5}") == 1.0
    assert mr.reward(r"\fbox{5}", r"\boxed{5}") == 1.0


def test_gold_without_box_scores_zero():
    assert mr.reward(r"\boxed{5}", "the answer is 5") == 0.0
    assert mr.gold_answer("the answer is 5") is None


def test_score_batch_exact_shapes_and_errors():
    res = mr.score_batch([r"\boxed{1}", r"\boxed{2}", "none"], [r"\boxed{1}"] * 3)
    assert res.rewards.dtype == np.float32
    np.testing.assert_array_equal(res.rewards, [1.0, 0.0, 0.0])
    assert (res.timeouts, res.crashes) == (0, 0)
    assert res.mean == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        mr.score_batch(["a"], ["b", "c"])
    with pytest.raises(ValueError):
        mr.score_batch(["a"], ["b"], mode="fuzzy")
    assert mr.score_batch([], [], mode="verify").rewards.shape == (0,)


# ---------------------------------------------------------------------------------- verify mode
@pytest.mark.parametrize("pred, gold, expected", [
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\frac{1}{2}", "0.5", 1.0),
    ("3000", r"3,\!000", 1.0),
    (r"1-\frac{1}{e}", "1-1/e", 1.0),
    ("1+1/e", "1-1/e", 0.0),
    ("4", r"4\sqrt{2}", 0.0),
    (r"4\sqrt{2}", "4", 0.0),
    ("1+x^2", "x^2+1", 1.0),
    (r"\frac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}", 1.0),
    ("0.99999", "1", 0.0),
    ("7", "8", 0.0),
])
def test_reward_verify(pool, pred, gold, expected):
    completion = "Work... so we get $\\boxed{%s}$." % pred
    solution = "Reference: $\\boxed{%s}$" % gold
    assert mr.reward(completion, solution, mode="verify", pool=pool) == expected


def test_verify_requires_a_box(pool):
    assert mr.reward("the answer is 0.5", r"\boxed{\frac12}", mode="verify", pool=pool) == 0.0
    assert mr.reward(r"\boxed{0.5} hmm, actually \boxed{3}", r"\boxed{\frac12}", mode="verify", pool=pool) == 0.0


def test_score_batch_verify_dedups_and_keeps_order(pool):
    comps = [r"\boxed{0.5}", r"\boxed{0.5}", r"\boxed{2}", r"\boxed{1/2}", "none", r"\boxed{\frac{1}{2}}"]
    res = mr.score_batch(comps, [r"\boxed{\frac{1}{2}}"] * len(comps), mode="verify", pool=pool)
    np.testing.assert_array_equal(res.rewards, [1, 1, 0, 1, 0, 1])
    assert res.timeouts == 0 and res.crashes == 0


def test_verify_from_another_thread(pool):
    """math-verify's signal.alarm only works in the main thread; the pool works from any thread."""
    out = {}

    def work():
        out["res"] = mr.score_batch([r"\boxed{0.5}", r"\boxed{3}"], [r"\boxed{\frac{1}{2}}"] * 2,
                                    mode="verify", pool=pool)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    np.testing.assert_array_equal(out["res"].rewards, [1.0, 0.0])


# ------------------------------------------------------------------------------------- hostile
def _nested(depth):
    return "\\boxed{" + "{" * depth + "1" + "}" * depth + "}"


HOSTILE = [
    _nested(50_000),                                     # 100k braces: depth cap
    _nested(100_000),                                    # 200k braces: length cap
    "\\boxed{" + "{" * 100_000,                          # unbalanced
    "\\boxed{" * 100_000,                                # many unterminated boxes
    "\\boxedx" * 25_000 + "\\boxed{5}",                  # many non-box commands, then a real one
    "x" * 3_000_000 + "\\boxed{5}",                      # megabytes: length cap
    "\\boxed{" + "1+" * 700 + "1}",                      # answer longer than MAX_ANSWER_CHARS
    "\\boxed{" + ("\\left(" * 2000) + "}",
    "\\boxed{" + "\\text{" * 300 + "}" * 300 + "}",
    None, 12345, b"\\boxed{5}", ["\\boxed{5}"],
]
TOWERS = [
    r"\boxed{10^{10^{10^{10}}}}",
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{(10^{10})!}",
]


def test_hostile_exact_is_fast_and_zero():
    t0 = time.perf_counter()
    res = mr.score_batch(HOSTILE + TOWERS, [r"\boxed{6}"] * (len(HOSTILE) + len(TOWERS)), mode="exact")
    assert time.perf_counter() - t0 < FINISHES_S
    assert not res.rewards.any()
    # the same texts against a gold of 5: the length cap decides the megabyte case, not the content
    assert mr.reward(HOSTILE[4], r"\boxed{5}") == 1.0
    assert mr.reward(HOSTILE[5], r"\boxed{5}") == 0.0


def test_extract_boxed_is_linear():
    t0 = time.perf_counter()
    assert mr.extract_boxed("\\boxedx" * 1_000_000 + "\\boxed{5}" + "\\fboxy" * 1_000_000) == "5"
    assert mr.extract_boxed("\\boxed{" + "{" * 3_000_000) is None
    assert mr.extract_boxed("x" * 10_000_000) is None
    assert time.perf_counter() - t0 < FINISHES_S


def test_hostile_verify_bounded_and_counted(pool):
    items = HOSTILE + TOWERS
    t0 = time.perf_counter()
    res = mr.score_batch(items, [r"\boxed{6}"] * len(items), mode="verify", timeout_s=1.0, pool=pool)
    elapsed = time.perf_counter() - t0
    assert not res.rewards.any()
    # Only the towers reach math-verify; each stalls it past the timeout (soft or hard).
    assert res.timeouts + res.crashes == len(TOWERS)
    # 3 items of at most ~1 s on 2 workers, plus restarts of killed workers; without the
    # timeouts the towers never finish
    assert elapsed < FINISHES_S, elapsed
    # the pool is healthy afterwards
    assert mr.reward(r"\boxed{0.5}", r"\boxed{\frac12}", mode="verify", pool=pool) == 1.0


def test_normalize_is_linear_on_huge_input():
    s = ("\\text{\\left(\\,a\\right)}  " * 50_000)
    t0 = time.perf_counter()
    out = mr.normalize_answer(s)
    assert time.perf_counter() - t0 < FINISHES_S
    assert out.startswith("(a) (a)")
