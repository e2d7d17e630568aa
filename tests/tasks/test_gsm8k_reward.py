"""GSM8K reward: gold after ####, prediction from "Final answer:" or a box, numeric comparison."""
import time
from fractions import Fraction

import numpy as np
import pytest

from arca_jax.tasks import gsm8k
from fixtures import FINISHES_S

GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"


def test_extract_gold():
    assert gsm8k.extract_gold(GOLD) == "1,072"
    assert gsm8k.extract_gold("a #### 5 #### 6") == "6"
    assert gsm8k.extract_gold("no marker") is None
    assert gsm8k.extract_gold("####   ") is None


@pytest.mark.parametrize("text, value", [
    ("1,072", Fraction(1072)),
    ("$1,072.00", Fraction(1072)),
    ("\\$18 dollars", Fraction(18)),
    ("18 eggs per day", Fraction(18)),
    ("-3", Fraction(-3)),
    ("2.5 hours", Fraction(5, 2)),
    ("1/2 cup", Fraction(1, 2)),
    ("1,234,567", Fraction(1234567)),
    ("25\\%", Fraction(25)),
    ("none", None),
    ("", None),
    (None, None),
    ("3/0", None),
])
def test_parse_number(text, value):
    assert gsm8k.parse_number(text) == value


@pytest.mark.parametrize("completion, expected", [
    ("... so she sold 1072 clips.\nFinal answer: 1072", 1.0),
    ("Final answer: $1,072", 1.0),
    ("final answer: 1072 clips", 1.0),
    ("The final answer is 1072.00", 1.0),
    ("Therefore \\boxed{1072}.", 1.0),
    ("Therefore \\boxed{1,072 \\text{ clips}}.", 1.0),
    ("Final answer: 1071", 0.0),
    ("The answer is 1072.", 0.0),  # neither marker: no prediction
    ("Final answer: 5\nLet me recheck. \\boxed{1072}", 1.0),  # the later one wins
    ("\\boxed{5}\nFinal answer: 1072", 1.0),
    ("\\boxed{1072}\nFinal answer: 5", 0.0),
    ("Final answer: forty", 0.0),
])
def test_reward(completion, expected):
    assert gsm8k.reward(completion, GOLD) == expected


def test_score_batch_and_hostile():
    huge = "Final answer: 1072 " * 200_000  # 3.8 MB: over the length cap
    t0 = time.perf_counter()
    res = gsm8k.score_batch(["Final answer: 1072", huge, None, "Final answer: " + "9" * 100_000],
                            [GOLD] * 4)
    assert time.perf_counter() - t0 < FINISHES_S
    np.testing.assert_array_equal(res.rewards, [1, 0, 0, 0])
    assert res.timeouts == 0
    with pytest.raises(ValueError):
        gsm8k.score_batch(["a"], [])
