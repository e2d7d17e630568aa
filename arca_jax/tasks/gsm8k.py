r"""GSM8K rewards: numeric comparison of the final answer.

Gold: the text after the last ``####`` of the reference answer. Prediction: whichever comes last in
the completion of a ``Final answer: N`` line (case-insensitive; "Final answer is N" also accepted) and
a ``\boxed{N}``. The number is the first one in that answer text after dropping thousands separators
(``1,234``), ``$``, ``\$``, ``\%``/``%`` and any units or words around it (``$18 dollars`` -> 18);
integers, decimals and simple fractions ``a/b`` are understood, compared exactly as rationals
(``18.00`` = ``18``). All in-process and linear time; completions longer than
``math.MAX_COMPLETION_CHARS`` score 0.

The reference ("Final answer:" line) reward, reward mode "gsm8k_final_answer" (``score_batch_final_answer``,
the reward of the paper authors' GSM8K prompt ``data.GSM8K_REFERENCE_TEMPLATE``) is stricter:

* prediction: the text after the LAST occurrence of ``Final answer:`` in the completion, matched
  case-insensitively (``final answer:``, ``FINAL ANSWER:``), up to the end of that line; no
  ``\boxed{}`` fallback, no "Final answer is";
* gold: the text after the last ``####`` of the reference answer;
* both are cleaned the same way: strip whitespace, delete every ``,`` and ``$``, strip whitespace,
  drop trailing periods; what is left must be one plain decimal number (``-3``, ``18``, ``2.50``,
  ``.5``; no units, words, fractions or exponents, else the reward is 0);
* the two numbers are compared exactly as decimals (``18.00`` = ``18``).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

import numpy as np

from arca_jax.tasks.math import MAX_ANSWER_CHARS, MAX_COMPLETION_CHARS, ScoreResult, extract_boxed

_FINAL = re.compile(r"final answer(?: is)?\s{0,8}[:=]?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?\d{1,40}(?:\.\d{1,40})?(?:/\d{1,40})?")
_MAX_LINE = 200
_FINAL_LINE = re.compile(r"final answer:", re.IGNORECASE)
_DECIMAL = re.compile(r"[+-]?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})")


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` (see the module docstring), as an exact Fraction, or None."""
    if not isinstance(text, str):
        return None
    s = text[:MAX_ANSWER_CHARS]
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("\\!", "").replace("\\,", "")
    s = _THOUSANDS.sub("", s)
    m = _NUMBER.search(s)
    if m is None:
        return None
    num = m.group(0)
    try:
        if "/" in num:
            a, b = num.split("/")
            return Fraction(Fraction(a), Fraction(b)) if Fraction(b) != 0 else None
        return Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gold(answer: str) -> str | None:
    """The text after the last ``####`` of a GSM8K reference answer (stripped), or None."""
    if not isinstance(answer, str) or "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip()
    return gold or None


def extract_prediction(completion: str) -> str | None:
    """The answer text of the last ``Final answer:`` line or last boxed expression, or None."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    final_pos, final_text = -1, None
    for m in _FINAL.finditer(completion):
        final_pos = m.start()
        final_text = completion[m.end():m.end() + _MAX_LINE].split("\n", 1)[0]
    box_pos = max(completion.rfind("\\boxed"), completion.rfind("\\fbox"))
    if box_pos > final_pos:
        boxed = extract_boxed(completion)
        if boxed is not None:
            return boxed
    return final_text


def reward(completion: str, solution: str) -> float:
    """1.0 if the predicted number equals the gold number of ``solution`` (a GSM8K answer text)."""
    gold = parse_number(extract_gold(solution))
    pred = parse_number(extract_prediction(completion))
    return float(gold is not None and pred is not None and gold == pred)


def score_batch(completions: Sequence[str], solutions: Sequence[str], **_ignored) -> ScoreResult:
    """Rewards for a batch (in-process; never times out). Extra keyword arguments are ignored."""
    return _score(reward, completions, solutions)


def _score(fn, completions: Sequence[str], solutions: Sequence[str]) -> ScoreResult:
    if len(completions) != len(solutions):
        raise ValueError("got %d completions and %d solutions" % (len(completions), len(solutions)))
    rewards = np.array([fn(c, s) for c, s in zip(completions, solutions)], dtype=np.float32)
    return ScoreResult(rewards=rewards)


def clean_final_number(text: str | None) -> Fraction | None:
    """The reference cleaning (module docstring): strip, drop ``,`` and ``$``, strip, drop trailing
    periods, then one plain decimal number as an exact Fraction, else None."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = text.strip().replace(",", "").replace("$", "").strip().rstrip(".")
    if _DECIMAL.fullmatch(s) is None:
        return None
    return Fraction(s)


def extract_final_answer(completion: str) -> str | None:
    """The rest of the line after the last ``Final answer:`` (case-insensitive), or None."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    last = None
    for last in _FINAL_LINE.finditer(completion):
        pass
    if last is None:
        return None
    return completion[last.end():].split("\n", 1)[0]


# deliberate: the same shape as `reward` with the reference parser (two rewards, one each)
def reward_final_answer(completion: str, solution: str) -> float:
    """1.0 if the last "Final answer:" line's number equals the gold number after ``####``."""
    gold = clean_final_number(extract_gold(solution))
    pred = clean_final_number(extract_final_answer(completion))
    return float(gold is not None and pred is not None and gold == pred)


def score_batch_final_answer(completions: Sequence[str], solutions: Sequence[str], **_ignored) -> ScoreResult:
    """``reward_final_answer`` for a batch (in-process; never times out). Extra keywords ignored."""
    return _score(reward_final_answer, completions, solutions)
