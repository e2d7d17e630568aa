r"""An embedded synthetic task: multi-step integer arithmetic with a short chain of steps.

Problem: ``What is (7+5)*3-4?`` (2 to 4 operations among + - * on integers 1..9, written with the
fewest parentheses that keep the intended order; a right operand of the same precedence keeps its
parentheses, so ``2-(3-1)`` and ``2*(3*4)`` are evaluated as written).

Solution: the expression rewritten one operation at a time, in standard evaluation order, then the
boxed value, e.g. ``(7+5)*3-4 = 12*3-4 = 36-4 = 32. \boxed{32}``, so the MATH reward code scores it.
Every intermediate value lies in [0, ``max_value``] (no negatives: unary minus would make the
rewriting ambiguous); expressions that leave this range are redrawn.

Splits: a problem text belongs to the held-out split "test" when the first 8 bytes of its SHA-256,
read as an integer, are divisible by ``TEST_MODULUS`` (10, so about 10% of all texts), else to "train".
Membership depends only on the text, so the splits are disjoint for any seed and any size, and are
independent of Python's hash seed. A split is the first ``n`` distinct texts of that split in the
stream drawn with ``random.Random(seed)``; a smaller ``n`` gives a prefix of a larger one.

No leakage through the chains: a held-out expression can also occur as an intermediate step of
another problem's solution (``3+4*6`` is a test problem and a step of ``3+4*(2*3) = 3+4*6 = ...``).
So the train split also skips every problem whose chain expressions (``chain_expressions``: the
expression and the intermediate steps, not the final value) share a string with the chain
expressions of the first ``held_out`` test problems (default ``DEFAULT_SIZES["test"]``, the whole
test split as generated, drawn with the same seed and options). The test split itself is unchanged.
With the defaults this skips about a third of the train-split draws (see
``tests/tasks/test_arithmetic_task.py``); a test split larger than ``held_out`` is only disjoint by text.

Lengths with the defaults: problem 14-28 characters, solution 25-90, prompt + solution under 130.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from typing import FrozenSet, Union

TEST_MODULUS = 10
DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 5000, "test": 500}
SPLITS = ("train", "test")
OPS = ("+", "-", "*")
_PREC = {"+": 1, "-": 1, "*": 2}

Node = Union[int, tuple]  # leaf: int; internal: (op, left, right)


@dataclasses.dataclass(frozen=True)
class ArithmeticExample:
    expression: str
    problem: str
    solution: str
    answer: int
    num_ops: int
    chain: tuple[str, ...] = ()  # ``steps()``: the expression, each rewrite, then the value


def chain_expressions(ex: ArithmeticExample) -> tuple[str, ...]:
    """The expressions of the solution chain: the problem's expression and the intermediate steps,
    without the final value (every chain ends with a bare number)."""
    return ex.chain[:-1]


def render(node: Node) -> str:
    """Infix text with the fewest parentheses that preserve the tree under left associativity."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    ls, rs = render(left), render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = "(" + ls + ")"
    if not isinstance(right, int) and _PREC[right[0]] <= _PREC[op]:
        rs = "(" + rs + ")"
    return ls + op + rs


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def evaluate(node: Node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    return _apply(op, evaluate(left), evaluate(right))


def _reduce_first(node: Node) -> Node:
    """Replace the first operation in post-order whose operands are both numbers by its value."""
    op, left, right = node
    if isinstance(left, int) and isinstance(right, int):
        return _apply(op, left, right)
    if not isinstance(left, int):
        return (op, _reduce_first(left), right)
    return (op, left, _reduce_first(right))


def steps(node: Node) -> list[str]:
    """The rewriting chain: the expression, then after each reduction, ending with the value."""
    chain = [render(node)]
    while not isinstance(node, int):
        node = _reduce_first(node)
        chain.append(render(node))
    return chain


def _random_tree(rng: random.Random, num_ops: int, lo: int, hi: int) -> Node:
    if num_ops == 0:
        return rng.randint(lo, hi)
    n_left = rng.randint(0, num_ops - 1)
    op = rng.choice(OPS)
    return (op, _random_tree(rng, n_left, lo, hi), _random_tree(rng, num_ops - 1 - n_left, lo, hi))


def _in_range(node: Node, max_value: int) -> bool:
    """All intermediate values of the evaluation lie in [0, max_value]."""
    if isinstance(node, int):
        return 0 <= node <= max_value
    op, left, right = node
    if not (_in_range(left, max_value) and _in_range(right, max_value)):
        return False
    return 0 <= evaluate(node) <= max_value


def make_example(node: Node) -> ArithmeticExample:
    chain = steps(node)
    value = evaluate(node)
    expression = chain[0]
    solution = " = ".join(chain) + ". \\boxed{%d}" % value
    ops = expression.count("+") + expression.count("-") + expression.count("*")
    return ArithmeticExample(expression=expression, problem="What is %s?" % expression,
                             solution=solution, answer=value, num_ops=ops, chain=tuple(chain))


def random_example(rng: random.Random, min_ops: int = 2, max_ops: int = 4, lo: int = 1, hi: int = 9,
                   max_value: int = 99) -> ArithmeticExample:
    """One example drawn from ``rng`` (redrawn until every intermediate value is in range)."""
    while True:
        tree = _random_tree(rng, rng.randint(min_ops, max_ops), lo, hi)
        if _in_range(tree, max_value):
            return make_example(tree)


def split_of(problem: str) -> str:
    """"test" or "train": a fixed function of the problem text (SHA-256, not Python's hash)."""
    digest = hashlib.sha256(problem.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_MODULUS == 0 else "train"


def generate(split: str, n: int | None = None, seed: int = DEFAULT_SEED, *,
             held_out: int = DEFAULT_SIZES["test"], **kwargs) -> list[ArithmeticExample]:
    """The first ``n`` (default ``DEFAULT_SIZES[split]``) distinct problems of ``split``.

    For "train", problems sharing a chain expression with the first ``held_out`` test problems
    (same seed and options) are skipped (module docstring); ``held_out=0`` turns that off.
    ``kwargs`` go to ``random_example`` (min_ops, max_ops, lo, hi, max_value).
    """
    if split not in SPLITS:
        raise ValueError("arithmetic splits are %s, got %r" % (SPLITS, split))
    n = DEFAULT_SIZES[split] if n is None else int(n)
    if int(held_out) < 0:
        raise ValueError("held_out must be >= 0, got %r" % (held_out,))
    banned: FrozenSet[str] = frozenset()
    if split == "train" and held_out:
        banned = held_out_expressions(int(held_out), seed, **kwargs)
    return _draw(split, n, int(seed), banned, kwargs)


def held_out_expressions(held_out: int = DEFAULT_SIZES["test"], seed: int = DEFAULT_SEED,
                         **kwargs) -> FrozenSet[str]:
    """Every chain expression (``chain_expressions``) of the first ``held_out`` test problems, or
    of those found in ``100 * held_out + 10_000`` draws when options leave fewer distinct test
    problems (a test split that small cannot be generated either)."""
    return _held_out_expressions(int(held_out), int(seed), tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=16)
def _held_out_expressions(held_out: int, seed: int, options: tuple) -> FrozenSet[str]:
    test = _draw("test", held_out, seed, frozenset(), dict(options), limit=100 * held_out + 10_000)
    return frozenset(e for ex in test for e in chain_expressions(ex))


def _draw(split: str, n: int, seed: int, banned: FrozenSet[str], kwargs: dict,
          limit: int | None = None) -> list[ArithmeticExample]:
    """The first ``n`` distinct ``split`` problems whose chains avoid ``banned``. Raises ValueError
    after ``1000 * n + 100_000`` draws; with ``limit``, returns what ``limit`` draws found."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[ArithmeticExample] = []
    attempts = 0
    max_attempts = 1000 * max(n, 1) + 100_000 if limit is None else limit
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            if limit is not None:
                return out
            raise ValueError("could not draw %d distinct %s problems with %s" % (n, split, kwargs))
        ex = random_example(rng, **kwargs)
        if ex.problem in seen or split_of(ex.problem) != split:
            continue
        seen.add(ex.problem)
        if banned and not banned.isdisjoint(chain_expressions(ex)):
            continue
        out.append(ex)
    return out
