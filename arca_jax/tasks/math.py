r"""MATH-style rewards: the last ``\boxed{}`` answer, exact match after light normalisation or
mathematical equivalence with math-verify, or the paper authors' plain string match.

All modes take the prediction from the completion's last boxed expression and the gold answer from
the solution's last boxed expression; a completion without one scores 0, whatever else it says.

Modes:

* "exact": ``extract_boxed`` + ``normalize_answer`` on both sides, string equality.
* "verify": "exact", then math-verify for the pairs that are not an exact match.
* "reference": the authors' reward, transcribed from its description (``reference_boxed`` +
  ``reference_normalize``, string equality). It differs from "exact" in small ways: only
  ``\boxed{`` counts (not ``\fbox``, not ``\boxed 5``); braces are counted literally (``\{`` too);
  if the last ``\boxed{`` is unbalanced there is no answer (score 0), earlier boxes are not tried;
  ``\text`` is deleted as a plain string so ``\text{cm}`` becomes ``{cm}``; ``\left``/``\right``
  are deleted as plain strings (so ``\leftarrow`` becomes ``arrow``); all trailing periods are
  dropped, before those deletions.

Bounds (hostile model output never raises and never hangs):

* ``extract_boxed`` runs in time linear in the text (``str.rfind`` and one forward scan, no regex).
* ``reward``/``score_batch`` score 0 for a completion longer than ``MAX_COMPLETION_CHARS``
  (200,000 characters; a 512-token generation is a few thousand), an extracted answer longer than
  ``MAX_ANSWER_CHARS`` (1,000) or nested deeper than ``MAX_BRACE_DEPTH`` (32) braces, in "exact"
  and "verify"; "reference" only has the completion cap. Normalisation uses only linear-time
  regexes, scans and ``str.replace``.
* "verify" first accepts an exact match in-process, then sends the remaining (gold, prediction) pairs
  to math-verify in worker processes (``verify_pool.VerifyPool``) with a per-item wall-clock timeout;
  a timed-out or crashed item scores 0 and is counted in ``ScoreResult``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from arca_jax.tasks import verify_pool as _vp

MAX_COMPLETION_CHARS = 200_000
MAX_ANSWER_CHARS = 1_000
MAX_BRACE_DEPTH = 32
DEFAULT_TIMEOUT_S = 5.0
MODES = ("exact", "verify", "reference")

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Rewards in {0, 1} (float32, one per completion) and how many items timed out or crashed."""

    rewards: np.ndarray
    timeouts: int = 0
    crashes: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.rewards)) if self.rewards.size else 0.0


def _is_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _last_box_command(text: str) -> int:
    r"""End index of the last ``\boxed``/``\fbox`` command (not a prefix of a longer name), or -1."""
    best = -1
    n = len(text)
    for cmd in _BOX_COMMANDS:
        end = n
        while True:
            i = text.rfind(cmd, 0, end)
            if i < 0:
                break
            j = i + len(cmd)
            if j < n and _is_letter(text[j]):  # e.g. \boxedfoo: another command
                end = j - 1
                continue
            best = max(best, j)
            break
    return best


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` or ``\fbox{...}`` in ``text``, braces matched.

    Escaped braces ``\{`` ``\}`` do not count. ``\boxed 5`` (no brace) gives the characters up to the
    next whitespace or ``$``. Returns None when there is no box, when the last box is unbalanced
    (for instance a truncated generation) or empty without braces. Linear time; never raises on str.
    """
    if not isinstance(text, str):
        return None
    j = _last_box_command(text)
    if j < 0:
        return None
    n = len(text)
    while j < n and text[j] in " \t\r\n":
        j += 1
    if j >= n:
        return None
    if text[j] != "{":
        k = j
        while k < n and not text[k].isspace() and text[k] != "$":
            k += 1
        return text[j:k] or None
    for k, depth in _brace_depths(text, j):
        if depth == 0:
            return text[j + 1:k]
    return None


def _brace_depths(s: str, start: int = 0):
    """(index, depth after it) of each unescaped brace of ``s`` from ``start`` (a backslash
    escapes the next character)."""
    depth = 0
    k, n = start, len(s)
    while k < n:
        ch = s[k]
        if ch == "\\":
            k += 2
            continue
        if ch in "{}":
            depth += 1 if ch == "{" else -1
            yield k, depth
        k += 1


def brace_depth(s: str) -> int:
    """Maximum nesting depth of unescaped ``{`` in ``s``."""
    return max((d for _, d in _brace_depths(s)), default=0)


_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING = re.compile(r"\\[,;!]")
_TEXT_CMD = re.compile(r"\\text(?![A-Za-z])")
_WHITESPACE = re.compile(r"\s+")


def _unwrap_text(s: str) -> str:
    r"""Drop ``\text`` commands, and the braces of the group that follows one (keeping its content)."""
    if "\\text" not in s:
        return s
    match = {}
    stack = []
    k, n = 0, len(s)
    while k < n:  # matching braces, one linear pass
        ch = s[k]
        if ch == "\\":
            k += 2
            continue
        if ch == "{":
            stack.append(k)
        elif ch == "}" and stack:
            match[stack.pop()] = k
        k += 1
    drop = set()
    for m in _TEXT_CMD.finditer(s):
        drop.update(range(m.start(), m.end()))
        j = m.end()
        while j < n and s[j] == " ":
            j += 1
        if j < n and s[j] == "{" and j in match:
            drop.add(j)
            drop.add(match[j])
    return "".join(ch for i, ch in enumerate(s) if i not in drop)


def normalize_answer(answer: str) -> str:
    r"""The paper's light normalisation of an extracted answer (for the "exact" mode).

    Drops ``\left``/``\right`` (not ``\leftarrow``...), the spacing commands ``\,`` ``\;`` ``\!`` and
    ``\text`` (keeping the content of its group: ``\text{cm}`` -> ``cm``); maps ``\dfrac`` and
    ``\tfrac`` to ``\frac``; collapses whitespace runs to one space, strips, and removes one trailing
    period. Linear time.
    """
    s = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _unwrap_text(s)
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub("", s)
    s = _WHITESPACE.sub(" ", s).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _usable_answer(text) -> str | None:
    """The last boxed answer of ``text`` if it is within the documented bounds, else None."""
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None
    ans = extract_boxed(text)
    if ans is None or len(ans) > MAX_ANSWER_CHARS or brace_depth(ans) > MAX_BRACE_DEPTH:
        return None
    if not normalize_answer(ans):
        return None
    return ans


def gold_answer(solution: str) -> str | None:
    """The gold answer of a MATH-style solution: its last boxed expression (None without one)."""
    return _usable_answer(solution)


_REFERENCE_BOX = "\\boxed{"
_REFERENCE_DELETE = ("\\left", "\\right", "\\,", "\\;", "\\!", "\\text")


def reference_boxed(text) -> str | None:
    r"""The authors' extraction: the content of the LAST ``\boxed{`` of ``text`` up to its matching
    ``}``, every ``{`` and ``}`` counted (escaped ones too). None without ``\boxed{``, or when that
    last box is unbalanced (earlier boxes are not tried). Linear time."""
    if not isinstance(text, str):
        return None
    i = text.rfind(_REFERENCE_BOX)
    if i < 0:
        return None
    start = i + len(_REFERENCE_BOX)
    depth = 1
    for k in range(start, len(text)):
        ch = text[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:k]
    return None


def reference_normalize(answer: str) -> str:
    r"""The authors' normalisation, in this order: strip; collapse whitespace runs to one space;
    drop all trailing periods; delete the strings ``\left``, ``\right``, ``\,``, ``\;``, ``\!`` and
    ``\text`` (plain string deletions: ``\text{cm}`` -> ``{cm}``, ``\leftarrow`` -> ``arrow``);
    map ``\dfrac`` and ``\tfrac`` to ``\frac``. Nothing is stripped or collapsed again afterwards."""
    s = _WHITESPACE.sub(" ", answer.strip())
    s = s.rstrip(".")
    for token in _REFERENCE_DELETE:
        s = s.replace(token, "")
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def reference_answer(text) -> str | None:
    """The normalised reference answer of ``text`` (completion or solution), None without one (no
    ``\\boxed{``, unbalanced, empty after normalisation, or ``text`` over ``MAX_COMPLETION_CHARS``)."""
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None
    ans = reference_boxed(text)
    if ans is None:
        return None
    return reference_normalize(ans) or None


def _score_reference(completions: Sequence[str], solutions: Sequence[str]) -> ScoreResult:
    rewards = np.zeros(len(completions), dtype=np.float32)
    gold_cache: dict = {}
    for i, (completion, solution) in enumerate(zip(completions, solutions)):
        if not isinstance(solution, str):
            continue
        if solution not in gold_cache:
            gold_cache[solution] = reference_answer(solution)
        gold = gold_cache[solution]
        if gold is not None and reference_answer(completion) == gold:
            rewards[i] = 1.0
    return ScoreResult(rewards=rewards)


def score_batch(completions: Sequence[str], solutions: Sequence[str], mode: str = "exact", *,
                timeout_s: float = DEFAULT_TIMEOUT_S, pool: "_vp.VerifyPool | None" = None) -> ScoreResult:
    """Score ``completions[i]`` against ``solutions[i]``; see the module docstring.

    ``mode="exact"`` and ``mode="reference"`` run in-process. ``mode="verify"`` uses ``pool`` (default: the process-wide
    ``verify_pool.get_default_pool()``) for the pairs that are not already an exact match; identical
    (gold, prediction) pairs in a batch are verified once. Raises ``ValueError`` for a bad mode or
    mismatched lengths, ``VerifyPoolError`` if the workers cannot start; never because of the content
    of a completion.
    """
    if mode not in MODES:
        raise ValueError("mode must be one of %s, got %r" % (MODES, mode))
    if len(completions) != len(solutions):
        raise ValueError("got %d completions and %d solutions" % (len(completions), len(solutions)))
    if mode == "reference":
        return _score_reference(completions, solutions)
    rewards = np.zeros(len(completions), dtype=np.float32)
    todo: dict[tuple[str, str], list[int]] = {}
    gold_cache: dict[str, str | None] = {}
    for i, (completion, solution) in enumerate(zip(completions, solutions)):
        if solution not in gold_cache:
            gold_cache[solution] = gold_answer(solution)
        gold = gold_cache[solution]
        pred = _usable_answer(completion)
        if gold is None or pred is None:
            continue
        if normalize_answer(pred) == normalize_answer(gold):
            rewards[i] = 1.0
        elif mode == "verify":
            todo.setdefault((gold, pred), []).append(i)
    timeouts = crashes = 0
    if todo:
        pool = pool if pool is not None else _vp.get_default_pool()
        pairs = list(todo)
        for pair, res in zip(pairs, pool.verify_pairs(pairs, timeout_s)):
            idx = todo[pair]
            if res.status == "ok" and res.value:
                rewards[idx] = 1.0
            elif res.status == "timeout":
                timeouts += len(idx)
            elif res.status == "crash":
                crashes += len(idx)
    return ScoreResult(rewards=rewards, timeouts=timeouts, crashes=crashes)


def reward(completion: str, solution: str, mode: str = "exact", *, timeout_s: float = DEFAULT_TIMEOUT_S,
           pool: "_vp.VerifyPool | None" = None) -> float:
    """1.0 if the completion's last boxed answer matches the solution's, else 0.0 (see ``score_batch``)."""
    return float(score_batch([completion], [solution], mode, timeout_s=timeout_s, pool=pool).rewards[0])
