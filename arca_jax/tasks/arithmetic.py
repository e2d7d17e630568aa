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

Lengths with the defaults: problem 14-28 characters, solution 25-90, prompt + solution under 130.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Union

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
                             solution=solution, answer=value, num_ops=ops)


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


def generate(split: str, n: int | None = None, seed: int = DEFAULT_SEED, **kwargs) -> list[ArithmeticExample]:
    """The first ``n`` (default ``DEFAULT_SIZES[split]``) distinct problems of ``split``.

    ``kwargs`` go to ``random_example`` (min_ops, max_ops, lo, hi, max_value).
    """
    if split not in SPLITS:
        raise ValueError("arithmetic splits are %s, got %r" % (SPLITS, split))
    n = DEFAULT_SIZES[split] if n is None else int(n)
    rng = random.Random(int(seed))
    seen: set[str] = set()
    out: list[ArithmeticExample] = []
    attempts = 0
    limit = 1000 * max(n, 1) + 100_000
    while len(out) < n:
        attempts += 1
        if attempts > limit:
            raise ValueError("could not draw %d distinct %s problems with %s" % (n, split, kwargs))
        ex = random_example(rng, **kwargs)
        if ex.problem in seen or split_of(ex.problem) != split:
            continue
        seen.add(ex.problem)
        out.append(ex)
    return out
