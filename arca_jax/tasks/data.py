r"""Problems, prompts and tasks: ``load_task(name, split, max_samples=None, path=None)``.

Tasks:
  "math"        DigitalLearningGmbH/MATH-lighteval (fields problem, solution, level, type; splits train,
                test) through Hugging Face ``datasets``; reward: last boxed answer ("exact" by default,
                as in the paper, "verify", or the authors' "reference").
  "gsm8k"       openai/gsm8k, config "main" (the canonical id of "gsm8k"; fields question, answer;
                splits train, test); reward: numeric comparison (``gsm8k.py``).
  "arithmetic"  embedded, generated (``arithmetic.py``; splits train, test, the train split free of
                the test split's expressions and solution steps); reward: the MATH reward.

``path=`` reads a local JSONL file instead (one JSON object per line, the same fields as the Hub
dataset: problem + solution for math and arithmetic, question + answer for gsm8k; optional ``id``,
``level``, ``type``). A directory is also accepted; it must hold ``<split>.jsonl``. Without ``path``
the Hub is used (or the ``datasets`` cache); offline or missing data raises ``TaskDataError`` saying
how to give a local file.

``max_samples`` keeps the first N problems in dataset order (no shuffling: the first 200 test
problems are a fixed evaluation set).

Prompts (``prompt_style="default"``). MATH and GSM8K use the paper's instruction, a blank line, the
problem, and a blank line: ``MATH_PROMPT_TEMPLATE`` = "Solve this math problem step by step. Put your
final answer in \boxed{}.\n\n{problem}\n\n" (the paper gives the instruction and says the problem
follows; the separators are our choice). The arithmetic task uses the compact
``ARITHMETIC_PROMPT_TEMPLATE`` = "{problem}\n" (e.g. "What is (7+5)*3-4?\n"): the tiny
character-level model has a context of about 256 characters and never needs the instruction, since
its pretraining data always ends in a boxed answer.

``prompt_style="reference"``: the paper authors' prompts (their code; ``PROMPT_TEMPLATES``).
  math:  ``MATH_REFERENCE_TEMPLATE`` = "Solve this math problem step by step. Put your final
         answer in \boxed{}.\n\nProblem: {problem}\n" (one newline at the end);
  gsm8k: ``GSM8K_REFERENCE_TEMPLATE`` = ``GSM8K_REFERENCE_SYSTEM`` ("You are a careful math solver.
         Work through the problem and end with a line of the form 'Final answer: <number>'.") +
         "\n\nQuestion: {problem}\nAnswer with reasoning, then finish with 'Final answer:
         <number>'." (no newline at the end), and by default its reward, "gsm8k_final_answer";
  arithmetic: not defined (ValueError).
``prompt_template=`` (a ``str.format`` template with {problem}) overrides either style.

Reward modes (``REWARD_MODES``): "exact", "verify" and "reference" score the last boxed answer
(``math.py``; "reference" is the authors' string match) and apply to math and arithmetic; "gsm8k"
(numeric, lenient) and "gsm8k_final_answer" (the authors' "Final answer:" line, strict) apply to
gsm8k (``gsm8k.py``). For gsm8k, "reference" means the authors' GSM8K reward and is stored as
"gsm8k_final_answer". Without ``reward_mode``: "exact" for math and arithmetic, "gsm8k" for gsm8k
in the default style and "gsm8k_final_answer" in the reference style.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from arca_jax.errors import ConfigError
from arca_jax.tasks import arithmetic as _arith
from arca_jax.tasks import gsm8k as _gsm8k
from arca_jax.tasks import math as _math

MATH_INSTRUCTION = "Solve this math problem step by step. Put your final answer in \\boxed{}."
MATH_PROMPT_TEMPLATE = MATH_INSTRUCTION.replace("{}", "{{}}") + "\n\n{problem}\n\n"
ARITHMETIC_PROMPT_TEMPLATE = "{problem}\n"
MATH_REFERENCE_TEMPLATE = MATH_INSTRUCTION.replace("{}", "{{}}") + "\n\nProblem: {problem}\n"
GSM8K_REFERENCE_SYSTEM = ("You are a careful math solver. Work through the problem and end with a line of "
                          "the form 'Final answer: <number>'.")
GSM8K_REFERENCE_TEMPLATE = (GSM8K_REFERENCE_SYSTEM + "\n\nQuestion: {problem}\n"
                            "Answer with reasoning, then finish with 'Final answer: <number>'.")
PROMPT_STYLES = ("default", "reference")
PROMPT_TEMPLATES = {
    ("math", "default"): MATH_PROMPT_TEMPLATE,
    ("gsm8k", "default"): MATH_PROMPT_TEMPLATE,
    ("arithmetic", "default"): ARITHMETIC_PROMPT_TEMPLATE,
    ("math", "reference"): MATH_REFERENCE_TEMPLATE,
    ("gsm8k", "reference"): GSM8K_REFERENCE_TEMPLATE,
}

HF_SOURCES = {
    "math": ("DigitalLearningGmbH/MATH-lighteval", None),
    "gsm8k": ("openai/gsm8k", "main"),
}
FIELDS = {"math": ("problem", "solution"), "gsm8k": ("question", "answer"),
          "arithmetic": ("problem", "solution")}
SPLITS = {"math": ("train", "test"), "gsm8k": ("train", "test"), "arithmetic": ("train", "test")}
DEFAULT_REWARD_MODE = {"math": "exact", "gsm8k": "gsm8k", "arithmetic": "exact"}
REFERENCE_DEFAULT_REWARD_MODE = {"math": "exact", "gsm8k": "gsm8k_final_answer"}
REWARD_MODES = ("exact", "verify", "reference", "gsm8k", "gsm8k_final_answer")
TASK_NAMES = tuple(SPLITS)


class TaskDataError(ConfigError, RuntimeError):
    """A task's data cannot be loaded (offline, missing, malformed); the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem. ``solution`` is what the reward compares against (MATH: a solution ending in
    ``\\boxed{}``; GSM8K: the answer text with ``#### N``); ``answer`` is the extracted gold answer
    (None if the solution has none: such a problem always scores 0)."""

    id: str
    problem: str
    prompt: str
    solution: str
    answer: str | None
    meta: dict = dataclasses.field(default_factory=dict, compare=False)


def format_prompt(problem: str, template: str = MATH_PROMPT_TEMPLATE) -> str:
    return template.format(problem=problem)


@dataclasses.dataclass(frozen=True)
class Task:
    """A named split of problems with its reward: what a task-agnostic trainer needs.

    ``reward_mode``: "exact", "verify" or "reference" (``math.score_batch``), "gsm8k"
    (``gsm8k.score_batch``) or "gsm8k_final_answer" (``gsm8k.score_batch_final_answer``).
    """

    name: str
    split: str
    problems: tuple[Problem, ...]
    reward_mode: str
    prompt_template: str

    def __post_init__(self):
        if self.reward_mode not in REWARD_MODES:
            raise ValueError("reward_mode must be one of %s, got %r" % (REWARD_MODES, self.reward_mode))

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, i):
        return self.problems[i]

    @property
    def prompts(self) -> list[str]:
        return [p.prompt for p in self.problems]

    def score_batch(self, completions: Sequence[str], problems: Sequence[Problem | str], *,
                    timeout_s: float = _math.DEFAULT_TIMEOUT_S, pool=None) -> _math.ScoreResult:
        """Rewards of ``completions[i]`` for ``problems[i]`` (a Problem or its solution text)."""
        solutions = [p.solution if isinstance(p, Problem) else p for p in problems]
        if self.reward_mode == "gsm8k":
            return _gsm8k.score_batch(completions, solutions)
        if self.reward_mode == "gsm8k_final_answer":
            return _gsm8k.score_batch_final_answer(completions, solutions)
        return _math.score_batch(completions, solutions, self.reward_mode, timeout_s=timeout_s, pool=pool)

    def reward(self, completion: str, problem: Problem | str, **kwargs) -> float:
        return float(self.score_batch([completion], [problem], **kwargs).rewards[0])


def _gold(name: str, solution: str, reward_mode: str) -> str | None:
    if name == "gsm8k":
        return _gsm8k.extract_gold(solution)
    if reward_mode == "reference":
        return _math.reference_boxed(solution)
    return _math.gold_answer(solution)


def _make_problem(name: str, split: str, index: int, row: dict, template: str, where: str,
                  reward_mode: str = "exact") -> Problem:
    qf, sf = FIELDS[name]
    for f in (qf, sf):
        if not isinstance(row.get(f), str):
            raise TaskDataError("%s: missing or non-string field %r (a %s row needs %r and %r)"
                                % (where, f, name, qf, sf))
    meta = {k: v for k, v in row.items() if k not in (qf, sf, "id")}
    pid = str(row["id"]) if row.get("id") is not None else "%s/%s/%d" % (name, split, index)
    return Problem(id=pid, problem=row[qf], prompt=format_prompt(row[qf], template), solution=row[sf],
                   answer=_gold(name, row[sf], reward_mode), meta=meta)


def _jsonl_hint(name: str) -> str:
    qf, sf = FIELDS[name]
    return ("pass path=<file.jsonl> (or a directory holding <split>.jsonl) with one JSON object per "
            "line and the fields %r and %r, for example {\"%s\": \"...\", \"%s\": \"...\"}"
            % (qf, sf, qf, sf))


def _read_jsonl(name: str, split: str, path: str, max_samples: int | None) -> list[dict]:
    if os.path.isdir(path):
        path = os.path.join(path, split + ".jsonl")
    if not os.path.isfile(path):
        raise TaskDataError("no such file: %s; %s" % (path, _jsonl_hint(name)))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and len(rows) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError("%s:%d: not valid JSON (%s); %s" % (path, lineno, e, _jsonl_hint(name))) from None
            if not isinstance(row, dict):
                raise TaskDataError("%s:%d: expected a JSON object; %s" % (path, lineno, _jsonl_hint(name)))
            row["__where__"] = "%s:%d" % (path, lineno)
            rows.append(row)
    return rows


def _read_hub(name: str, split: str, max_samples: int | None) -> list[dict]:
    repo, config = HF_SOURCES[name]
    try:
        import datasets
    except ImportError as e:
        raise TaskDataError("the 'datasets' package is needed to load %s from the Hugging Face Hub (%s); "
                            "install it, or %s" % (name, e, _jsonl_hint(name))) from e
    try:
        ds = datasets.load_dataset(repo, config, split=split)
        if max_samples is not None:
            ds = ds.select(range(min(int(max_samples), len(ds))))
        rows = [dict(r) for r in ds]
    except Exception as e:  # offline, missing, renamed, corrupted cache...
        raise TaskDataError(
            "could not load %s split %r from the Hugging Face Hub (%s%s): %s: %s\n"
            "Check the network or the datasets cache (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or %s."
            % (name, split, repo, "" if config is None else ", " + config, type(e).__name__, e,
               _jsonl_hint(name))) from e
    for i, row in enumerate(rows):
        row["__where__"] = "%s[%s][%d]" % (repo, split, i)
    return rows


def _resolve_reward_mode(name: str, prompt_style: str, reward_mode: str | None) -> str:
    if not reward_mode:
        table = REFERENCE_DEFAULT_REWARD_MODE if prompt_style == "reference" else DEFAULT_REWARD_MODE
        return table[name]
    if reward_mode not in REWARD_MODES:
        raise ValueError("reward_mode must be one of %s, got %r" % (REWARD_MODES, reward_mode))
    if name == "gsm8k" and reward_mode == "reference":
        return "gsm8k_final_answer"
    if reward_mode == "gsm8k_final_answer" and name != "gsm8k":
        raise ValueError("reward_mode 'gsm8k_final_answer' is for the gsm8k task, not %r" % name)
    return reward_mode


def load_task(name: str, split: str, max_samples: int | None = None, path: str | os.PathLike | None = None,
              *, reward_mode: str | None = None, prompt_template: str | None = None,
              prompt_style: str = "default", seed: int = _arith.DEFAULT_SEED,
              **arithmetic_options: Any) -> Task:
    """Load a task split; see the module docstring.

    ``prompt_style``: "default" (ours) or "reference" (the authors' prompts; math and gsm8k).
    ``reward_mode`` defaults to "exact" for math and arithmetic (the paper's reward) and, for gsm8k,
    "gsm8k" (default style) or "gsm8k_final_answer" (reference style). Raises ``ValueError`` for a
    reward mode that does not fit the task.

    ``seed`` and ``arithmetic_options`` (min_ops, max_ops, lo, hi, max_value, held_out) only apply
    to the generated arithmetic task, where ``max_samples`` is the number generated (default
    ``arithmetic.DEFAULT_SIZES[split]``); its train split leaves out problems whose solution chain
    shares an expression with the test split's (``arithmetic.generate``).
    """
    if name not in SPLITS:
        raise ValueError("unknown task %r; known: %s" % (name, TASK_NAMES))
    if split not in SPLITS[name]:
        raise ValueError("%s has splits %s, got %r" % (name, SPLITS[name], split))
    if max_samples is not None and int(max_samples) < 0:
        raise ValueError("max_samples must be >= 0")
    if arithmetic_options and (name != "arithmetic" or path is not None):
        raise TypeError("unexpected options for %s: %s" % (name, sorted(arithmetic_options)))
    if prompt_style not in PROMPT_STYLES:
        raise ValueError("prompt_style must be one of %s, got %r" % (PROMPT_STYLES, prompt_style))
    if (name, prompt_style) not in PROMPT_TEMPLATES:
        raise ValueError("prompt_style %r is not defined for the %s task (only for %s)" % (
            prompt_style, name, sorted(n for n, st in PROMPT_TEMPLATES if st == prompt_style)))
    reward_mode = _resolve_reward_mode(name, prompt_style, reward_mode)
    if prompt_template is None:
        prompt_template = PROMPT_TEMPLATES[(name, prompt_style)]

    if path is not None:
        rows = _read_jsonl(name, split, os.fspath(path), max_samples)
        if not rows and max_samples != 0:
            raise TaskDataError("%s holds no problems; %s" % (os.fspath(path), _jsonl_hint(name)))
    elif name == "arithmetic":
        rows = [{"problem": ex.problem, "solution": ex.solution, "answer": str(ex.answer),
                 "num_ops": ex.num_ops, "__where__": "arithmetic"}
                for ex in _arith.generate(split, max_samples, seed=seed, **arithmetic_options)]
    else:
        rows = _read_hub(name, split, max_samples)

    problems = []
    for i, row in enumerate(rows):
        where = row.pop("__where__")
        if name == "arithmetic" and path is None:
            row.pop("answer")
        problems.append(_make_problem(name, split, i, row, prompt_template, where, reward_mode))
    return Task(name=name, split=split, problems=tuple(problems), reward_mode=reward_mode,
                prompt_template=prompt_template)
