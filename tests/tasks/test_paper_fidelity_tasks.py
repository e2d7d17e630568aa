r"""Settings that select the paper authors' task behaviour: the reference MATH / GSM8K prompts
(`task.prompt_style`), the reference MATH reward (`task.reward_mode: reference`), the GSM8K
"Final answer:" reward, and which side of a long prompt is cut (`rollout.prompt_truncation`)."""
import glob
import os
import time
from fractions import Fraction

import numpy as np
import pytest

from arca_jax import config
from arca_jax.configlib import ConfigError
from arca_jax.tasks import data, gsm8k, load_task
from arca_jax.tasks import math as mr
from fixtures import FINISHES_S, REPO, write_jsonl

PAPER = os.path.join(REPO, "experiments", "configs", "paper")
INSTRUCTION = "Solve this math problem step by step. Put your final answer in \\boxed{}."


def _write_jsonl(path, rows):
    return str(write_jsonl(path, rows))


# ---------------------------------------------------------------- reference MATH reward

def _transcription(text):
    """An independent transcription of the description: last "\\boxed{", balanced braces, then
    strip / collapse / trailing periods / deletions / dfrac, tfrac -> frac."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, chars = 1, []
    for c in text[start + len("\\boxed{"):]:
        depth += (c == "{") - (c == "}")
        if depth == 0:
            break
        chars.append(c)
    else:
        return None
    s = " ".join("".join(chars).split())
    while s.endswith("."):
        s = s[:-1]
    for t in ("\\left", "\\right", "\\,", "\\;", "\\!", "\\text"):
        s = s.replace(t, "")
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _transcribed_reward(completion, solution):
    gold, pred = _transcription(solution), _transcription(completion)
    return float(bool(gold) and pred == gold)


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}}", "\\sqrt{\\frac{a}{b^{2}}}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box only
    ("\\boxed{1} and then \\boxed{2", None),  # last box unbalanced: no answer, \boxed{1} not used
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # braces counted literally: escaped ones balance
    ("\\fbox{3}", None),  # only \boxed{ counts
    ("\\boxed 3", None),
    ("no box at all", None),
    ("\\boxed{}", ""),
])
def test_reference_boxed(text, answer):
    assert mr.reference_boxed(text) == answer
    assert _transcription(text) == (None if answer is None else mr.reference_normalize(answer))


@pytest.mark.parametrize("raw, norm", [
    ("  x  +\n 1 ", "x + 1"),  # strip, whitespace runs -> one space
    ("5..", "5"),  # every trailing period
    ("5\\text{ cm}", "5{ cm}"),  # \text goes, its braces stay
    ("5 \\text{cm}", "5 {cm}"),
    ("\\textbf{x}", "bf{x}"),  # a plain string deletion
    ("\\left(1,2\\right)", "(1,2)"),
    ("\\left[ 0, 1 \\right)", "[ 0, 1 )"),
    ("\\leftarrow", "arrow"),
    ("1\\,000\\;0\\!1", "100001"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("x \\, y", "x  y"),  # deletions come after the whitespace collapse
    ("1 .", "1 "),  # ... and the periods are dropped after the strip
])
def test_reference_normalize(raw, norm):
    assert mr.reference_normalize(raw) == norm
    assert _transcription("\\boxed{%s}" % raw) == norm


SOL = "Adding, we get $\\boxed{\\dfrac{3}{4}}$."


@pytest.mark.parametrize("completion, solution, expected", [
    ("So \\boxed{\\frac{3}{4}}.", SOL, 1.0),
    ("So \\boxed{\\tfrac{3}{4}}", SOL, 1.0),
    ("So \\boxed{ \\frac{3}{4}. }", SOL, 1.0),
    ("So \\boxed{\\frac34}", SOL, 0.0),  # no equivalence: strings only
    ("So \\boxed{0.75}", SOL, 0.0),
    ("\\boxed{\\frac{3}{4}} no wait \\boxed{1}", SOL, 0.0),
    ("\\boxed{1} no wait \\boxed{\\frac{3}{4}}", SOL, 1.0),
    ("\\boxed{\\frac{3}{4}} then \\boxed{\\frac{3}{4}", SOL, 0.0),  # unbalanced last box
    ("The answer is 3/4.", SOL, 0.0),  # no box
    ("\\boxed{\\left(2, 3\\right)}", "so $\\boxed{(2, 3)}$", 1.0),
    ("\\boxed{(2,3)}", "so $\\boxed{(2, 3)}$", 0.0),  # spaces are kept (collapsed only)
    ("\\boxed{12\\text{ cm}}", "$\\boxed{12\\text{ cm}}$", 1.0),
    ("\\boxed{12 cm}", "$\\boxed{12\\text{ cm}}$", 0.0),  # "12{ cm}" != "12 cm"
    ("\\boxed{10\\,000}", "\\boxed{10000}", 1.0),
    ("\\boxed{5}", "no gold box", 0.0),
    ("\\boxed{}", "\\boxed{}", 0.0),  # an empty gold is no gold
    ("\\boxed{5}", "\\boxed{5", 0.0),
])
def test_reference_reward(completion, solution, expected):
    assert mr.reward(completion, solution, mode="reference") == expected
    assert _transcribed_reward(completion, solution) == expected


def test_reference_differs_from_exact_where_documented():
    # exact unwraps \text{} and also reads \fbox; reference does neither
    assert mr.reward("\\boxed{12 cm}", "$\\boxed{12\\text{ cm}}$", mode="exact") == 1.0
    assert mr.reward("\\fbox{7}", "\\boxed{7}", mode="exact") == 1.0
    assert mr.reward("\\fbox{7}", "\\boxed{7}", mode="reference") == 0.0
    # exact falls back to nothing either when the last box is unbalanced
    assert mr.reward("\\boxed{7} \\boxed{7", "\\boxed{7}", mode="exact") == 0.0


def test_reference_score_batch_matches_transcription_on_random_strings():
    rng = np.random.default_rng(0)
    alphabet = list("{} .\\12x") + ["\\boxed{", "\\left", "\\text", "\\dfrac", "\\,", "\\right"]
    def rand(n):
        return "".join(rng.choice(alphabet, size=int(rng.integers(0, n))))

    texts = [rand(4) + "\\boxed{" + rand(10) + "}" + rand(4) if rng.random() < 0.7 else rand(14)
             for _ in range(3000)]
    comps, sols = texts[:1500], texts[1500:]
    sols = [sols[i] if i % 3 else comps[i] + " ." for i in range(1500)]  # many equal pairs
    res = mr.score_batch(comps, sols, mode="reference")
    want = [_transcribed_reward(c, s) for c, s in zip(comps, sols)]
    np.testing.assert_array_equal(res.rewards, want)
    assert res.rewards.sum() > 50 and res.timeouts == 0 and res.crashes == 0


def test_reference_hostile_is_fast_and_zero():
    t0 = time.perf_counter()
    res = mr.score_batch(["\\boxed{" * 150_000, "\\boxed{1}" + "{" * 190_000, "{" * 190_000 + "\\boxed{1",
                          "\\boxed{1}" + " " * mr.MAX_COMPLETION_CHARS, None],
                         ["\\boxed{1}"] * 5, mode="reference")
    np.testing.assert_array_equal(res.rewards, [0, 1, 0, 0, 0])  # the 2nd: its last box is balanced
    assert time.perf_counter() - t0 < FINISHES_S
    with pytest.raises(ValueError, match="mode"):
        mr.score_batch(["x"], ["y"], mode="references")


# ---------------------------------------------------------------- prompts

MATH_ROWS = [{"problem": "What is $1+{1}$?", "solution": "$\\boxed{2}$"},
             {"problem": "Simplify $\\frac{2}{4}$.", "solution": "$\\boxed{\\dfrac{1}{2}}$"}]
GSM_ROWS = [{"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3+1000\n#### 1,003"}]


def test_math_reference_prompt(tmp_path):
    f = _write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    ref = load_task("math", "train", path=f, prompt_style="reference")
    assert ref.problems[0].prompt == INSTRUCTION + "\n\nProblem: What is $1+{1}$?\n"
    assert ref.reward_mode == "exact"  # the prompt style alone keeps the reward
    default = load_task("math", "train", path=f)
    assert default.problems[0].prompt == INSTRUCTION + "\n\nWhat is $1+{1}$?\n\n"  # unchanged
    task = load_task("math", "train", path=f, prompt_style="reference", reward_mode="reference")
    assert task.reward_mode == "reference" and task.problems[1].answer == "\\dfrac{1}{2}"
    np.testing.assert_array_equal(
        task.score_batch(["\\boxed{\\frac{1}{2}}", "\\boxed{\\tfrac{1}{2}}", "\\boxed{0.5}"],
                         [task.problems[1]] * 3).rewards, [1, 1, 0])
    custom = load_task("math", "train", path=f, prompt_style="reference", prompt_template="Q: {problem}")
    assert custom.problems[0].prompt == "Q: What is $1+{1}$?"  # an explicit template wins


def test_gsm8k_reference_prompt_and_reward(tmp_path):
    f = _write_jsonl(tmp_path / "g.jsonl", GSM_ROWS)
    task = load_task("gsm8k", "test", path=f, prompt_style="reference")
    assert task.problems[0].prompt == (
        "You are a careful math solver. Work through the problem and end with a line of the form "
        "'Final answer: <number>'.\n\nQuestion: Tom has 3 apples and buys 1,000 more. How many?\n"
        "Answer with reasoning, then finish with 'Final answer: <number>'.")
    assert task.reward_mode == "gsm8k_final_answer"  # selected by the reference style
    np.testing.assert_array_equal(
        task.score_batch(["3 + 1000 = 1003.\nFinal answer: 1,003.", "\\boxed{1003}"],
                         task.problems * 2).rewards, [1, 0])
    # "reference" names the authors' reward of the task; an explicit "gsm8k" keeps ours
    assert load_task("gsm8k", "test", path=f, reward_mode="reference").reward_mode == "gsm8k_final_answer"
    assert load_task("gsm8k", "test", path=f, prompt_style="reference",
                     reward_mode="gsm8k").reward_mode == "gsm8k"
    assert load_task("gsm8k", "test", path=f).reward_mode == "gsm8k"


def test_prompt_style_errors(tmp_path):
    f = _write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    with pytest.raises(ValueError, match="prompt_style"):
        load_task("math", "train", path=f, prompt_style="authors")
    with pytest.raises(ValueError, match="not defined for the arithmetic"):
        load_task("arithmetic", "test", 3, prompt_style="reference")
    with pytest.raises(ValueError, match="gsm8k_final_answer"):
        load_task("math", "train", path=f, reward_mode="gsm8k_final_answer")
    assert load_task("arithmetic", "test", 3, reward_mode="reference").reward_mode == "reference"


# ---------------------------------------------------------------- GSM8K "Final answer:" reward

GOLD = "She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"


@pytest.mark.parametrize("completion, expected", [
    ("... so 1072 clips.\nFinal answer: 1072", 1.0),
    ("Final answer: 1,072", 1.0),
    ("Final answer: $1,072.", 1.0),
    ("Final answer: 1072.00", 1.0),
    ("final answer: 1072", 1.0),  # case-insensitive
    ("FINAL ANSWER:1072  ", 1.0),
    ("Final answer: 5\nchecking... Final answer: 1072\nthanks", 1.0),  # the last one
    ("Final answer: 1072\nFinal answer: 5", 0.0),
    ("Final answer: 5 Final answer: 1072", 1.0),  # the last occurrence on the line
    ("Final answer: 1072 clips", 0.0),  # strict: one number only
    ("Final answer: **1072**", 0.0),
    ("Final answer:\n1072", 0.0),  # the rest of the marker's own line
    ("The final answer is 1072", 0.0),
    ("\\boxed{1072}", 0.0),  # no box fallback
    ("Final answer: 1071", 0.0),
    ("Final answer: 2144/2", 0.0),
    ("", 0.0),
])
def test_final_answer_reward(completion, expected):
    assert gsm8k.reward_final_answer(completion, GOLD) == expected


@pytest.mark.parametrize("text, value", [
    (" 1,072. ", Fraction(1072)), ("$18", Fraction(18)), ("-3", Fraction(-3)), ("+4", Fraction(4)),
    ("2.50", Fraction(5, 2)), (".5", Fraction(1, 2)), ("7..", Fraction(7)),
    ("18 dollars", None), ("1e3", None), ("3/4", None), ("", None), (".", None), (None, None),
    ("9" * 2000, None),
])
def test_clean_final_number(text, value):
    assert gsm8k.clean_final_number(text) == value


def test_final_answer_hostile_and_batch():
    t0 = time.perf_counter()
    res = gsm8k.score_batch_final_answer(
        ["Final answer: 1072", "Final answer: 1072 " * 200_000, None, "Final answer: " + "9" * 100_000,
         "final answer:" * 50_000], [GOLD] * 5)
    np.testing.assert_array_equal(res.rewards, [1, 0, 0, 0, 0])
    assert time.perf_counter() - t0 < FINISHES_S
    assert gsm8k.reward_final_answer("Final answer: 5", "no marker") == 0.0
    with pytest.raises(ValueError):
        gsm8k.score_batch_final_answer(["a"], [])


# ---------------------------------------------------------------- prompt truncation

class _CharTokenizer:
    """One token per character (its code point)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_encode_prompts_truncation_sides():
    from arca_jax.trainer.rollout import encode_prompts

    tok = _CharTokenizer()
    ids, mask = encode_prompts(tok, ["abcdef", "xy"], 4, 0)  # default: today's behaviour
    np.testing.assert_array_equal(ids, [[ord(c) for c in "cdef"], [0, 0, ord("x"), ord("y")]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
    left, _ = encode_prompts(tok, ["abcdef", "xy"], 4, 0, "left")
    np.testing.assert_array_equal(left, ids)
    right, rmask = encode_prompts(tok, ["abcdef", "xy"], 4, 0, "right")  # the first tokens stay
    np.testing.assert_array_equal(right, [[ord(c) for c in "abcd"], [0, 0, ord("x"), ord("y")]])
    np.testing.assert_array_equal(rmask, mask)
    with pytest.raises(ValueError, match="truncation"):
        encode_prompts(tok, ["a"], 4, 0, "middle")


def test_config_fields_and_validation():
    c = config.load()
    assert (c.task.prompt_style, c.task.reward_mode, c.rollout.prompt_truncation) == ("default", None, "left")
    c = config.load(overrides=["task.name=gsm8k", "task.prompt_style=reference",
                               "task.reward_mode=gsm8k_final_answer", "rollout.prompt_truncation=right"])
    assert (c.task.prompt_style, c.task.reward_mode, c.rollout.prompt_truncation) == (
        "reference", "gsm8k_final_answer", "right")
    for bad in (["rollout.prompt_truncation=start"], ["task.prompt_style=authors"],
                ["task.prompt_style=reference"],  # the arithmetic task has no reference prompt
                ["task.reward_mode=gsm8k_final_answer"]):
        with pytest.raises((ConfigError, ValueError)):
            config.load(overrides=bad)


# ---------------------------------------------------------------- the paper configs

def test_paper_configs_select_the_reference_behaviour():
    files = sorted(glob.glob(os.path.join(PAPER, "*.yaml")))
    assert len(files) == 7
    for f in files:
        c = config.load(f)
        assert (c.task.prompt_style, c.task.reward_mode, c.rollout.prompt_truncation) == (
            "reference", "reference", "right"), f


@pytest.mark.parametrize("name", ["arca_r64.yaml", "uniform_r64.yaml"])
def test_paper_config_renders_the_authors_first_math_prompt(tmp_path, name):
    problem = "Let $f(x) = \\{x\\}^2$ and {a}. Find $f(3)$ if  $x\\geq 0$.\n(Two lines.)"
    path = _write_jsonl(tmp_path / "train.jsonl",
                        [{"problem": problem, "solution": "So $\\boxed{9}$."},
                         {"problem": "Second.", "solution": "$\\boxed{1}$"}])
    cfg = config.load(os.path.join(PAPER, name), overrides=[f"task.path={tmp_path}"])
    t = cfg.task
    task = load_task(t.name, t.train_split, max_samples=t.max_train_samples, path=t.path,
                     reward_mode=t.reward_mode, prompt_style=t.prompt_style)
    assert task.problems[0].prompt == (
        "Solve this math problem step by step. Put your final answer in \\boxed{}.\n\nProblem: "
        + problem + "\n")
    assert task.reward_mode == "reference"
    assert task.reward("... so \\boxed{9.}", task.problems[0]) == 1.0
    assert data.MATH_REFERENCE_TEMPLATE.format(problem=problem) == task.problems[0].prompt


def test_bucket_prompts_widens_to_a_power_of_two_within_the_budget():
    from arca_jax.prompts import bucket_prompts

    ids = np.array([[0, 7, 8], [5, 6, 9]], np.int32)
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    wide, wmask = bucket_prompts(ids, mask, max_tokens=64, pad_id=0)
    assert wide.shape == (2, 16)  # at least 16
    np.testing.assert_array_equal(wide[:, -3:], ids)
    np.testing.assert_array_equal(wmask, np.pad(mask, ((0, 0), (13, 0))))
    ids21 = np.ones((1, 21), np.int32)
    assert bucket_prompts(ids21, ids21, max_tokens=64)[0].shape == (1, 32)
    assert bucket_prompts(ids21, ids21, max_tokens=24)[0].shape == (1, 24)  # capped at max_prompt_tokens
    assert bucket_prompts(ids21, ids21, max_tokens=16)[0].shape == (1, 21)  # never narrower
