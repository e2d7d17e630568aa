"""Task loading: local JSONL fixtures, the Hub path (monkeypatched), clear errors when data is
missing or offline, prompts, and task-agnostic scoring."""
import sys

import numpy as np
import pytest

from arca_jax.tasks import data
from arca_jax.tasks.data import Problem, TaskDataError, load_task
from fixtures import write_jsonl

MATH_ROWS = [
    {"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "level": "Level 1",
     "type": "Prealgebra"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\dfrac{1}{2}}$.",
     "level": "Level 2", "type": "Algebra", "id": "alg-7"},
    {"problem": "No box here.", "solution": "The answer is 3.", "level": "Level 1", "type": "Algebra"},
]
GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A 1,000 dollar thing?", "answer": "#### 1,000"},
]


def _write_jsonl(path, rows):
    return write_jsonl(path, rows, trailing_newline=True)


def test_prompt_template():
    assert data.MATH_PROMPT_TEMPLATE.format(problem="P") == (
        "Solve this math problem step by step. Put your final answer in \\boxed{}.\n\nP\n\n")
    assert data.format_prompt("What is 1+2?", data.ARITHMETIC_PROMPT_TEMPLATE) == "What is 1+2?\n"
    # braces in the problem are not template fields
    assert data.format_prompt("Find $f\\{x\\}$ {a}") .endswith("Find $f\\{x\\}$ {a}\n\n")


def test_load_math_jsonl(tmp_path):
    f = _write_jsonl(tmp_path / "math_test.jsonl", MATH_ROWS)
    task = load_task("math", "test", path=f)
    assert (task.name, task.split, task.reward_mode, len(task)) == ("math", "test", "exact", 3)
    p0, p1, p2 = task.problems
    assert p0.id == "math/test/0" and p1.id == "alg-7"
    assert p0.problem == "What is $1+1$?"
    assert p0.prompt == data.MATH_PROMPT_TEMPLATE.format(problem="What is $1+1$?")
    assert p0.answer == "2" and p1.answer == "\\dfrac{1}{2}" and p2.answer is None
    assert p0.meta == {"level": "Level 1", "type": "Prealgebra"}
    assert task.prompts == [p.prompt for p in task.problems]
    res = task.score_batch(["\\boxed{2}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}"], task.problems)
    np.testing.assert_array_equal(res.rewards, [1, 1, 0])  # no gold box: always 0
    assert task.reward("so \\boxed{2}", p0) == 1.0
    assert task.reward("so \\boxed{2}", p0.solution) == 1.0  # a solution string works too

    assert len(load_task("math", "test", max_samples=2, path=f)) == 2
    assert len(load_task("math", "test", max_samples=0, path=f)) == 0


def test_load_jsonl_from_directory_and_verify_mode(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", MATH_ROWS[:2])
    task = load_task("math", "train", path=tmp_path, reward_mode="verify")
    assert len(task) == 2 and task.reward_mode == "verify"
    with pytest.raises(TaskDataError, match="test.jsonl"):
        load_task("math", "test", path=tmp_path)


def test_load_gsm8k_jsonl(tmp_path):
    f = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    task = load_task("gsm8k", "test", path=f)
    assert task.reward_mode == "gsm8k"
    assert [p.answer for p in task] == ["7", "1,000"]
    assert task.problems[0].prompt.startswith(data.MATH_INSTRUCTION)
    res = task.score_batch(["Final answer: 7", "\\boxed{1000}"], task.problems)
    np.testing.assert_array_equal(res.rewards, [1, 1])


@pytest.mark.parametrize("content, match", [
    ('{"problem": "x", "solution": "\\\\boxed{1}"}\nnot json\n', r":2: not valid JSON"),
    ('{"problem": "x"}\n', r"missing or non-string field 'solution'"),
    ('[1, 2]\n', "expected a JSON object"),
    ('\n\n', "holds no problems"),
])
def test_bad_jsonl_errors(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(TaskDataError, match=match) as info:
        load_task("math", "test", path=f)
    assert "path=" in str(info.value) or "field" in str(info.value)


def test_missing_file_error(tmp_path):
    with pytest.raises(TaskDataError) as info:
        load_task("gsm8k", "train", path=tmp_path / "nope.jsonl")
    msg = str(info.value)
    assert "nope.jsonl" in msg and "path=" in msg and "'question'" in msg and "'answer'" in msg


def test_offline_hub_error_says_how_to_use_a_local_file(monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskDataError) as info:
        load_task("math", "test", max_samples=200)
    msg = str(info.value)
    assert "DigitalLearningGmbH/MATH-lighteval" in msg and "ConnectionError" in msg
    assert "path=" in msg and "jsonl" in msg and "'problem'" in msg and "'solution'" in msg
    assert calls[0][0] == ("DigitalLearningGmbH/MATH-lighteval", None) and calls[0][1] == {"split": "test"}
    with pytest.raises(TaskDataError, match="openai/gsm8k"):
        load_task("gsm8k", "train")


def test_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(TaskDataError, match="datasets"):
        load_task("gsm8k", "test")


def test_hub_path_with_a_fake_dataset(monkeypatch):
    import datasets

    def fake(repo, config, split):
        assert (repo, config, split) == ("openai/gsm8k", "main", "train")
        return datasets.Dataset.from_list(GSM_ROWS * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = load_task("gsm8k", "train", max_samples=4)
    assert len(task) == 4
    assert [p.id for p in task] == ["gsm8k/train/%d" % i for i in range(4)]
    assert task.problems[1].answer == "1,000"


def test_bad_names():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu", "test")
    with pytest.raises(ValueError, match="splits"):
        load_task("math", "validation")
    with pytest.raises(TypeError):
        load_task("math", "test", max_ops=3)
    with pytest.raises(ValueError):
        load_task("arithmetic", "test", reward_mode="fuzzy")


def test_arithmetic_task():
    task = load_task("arithmetic", "test", max_samples=50)
    assert (task.name, task.reward_mode, len(task)) == ("arithmetic", "exact", 50)
    p = task.problems[0]
    assert isinstance(p, Problem) and p.id == "arithmetic/test/0"
    assert p.prompt == p.problem + "\n" and p.solution.endswith("\\boxed{%s}" % p.answer)
    assert len(p.prompt) + len(p.solution) < 256
    res = task.score_batch([q.solution for q in task], task.problems)
    assert res.rewards.all()
    wrong = ["\\boxed{%d}" % (int(q.answer) + 1) for q in task]
    assert not task.score_batch(wrong, task.problems).rewards.any()
    # options go to the generator
    hard = load_task("arithmetic", "train", max_samples=20, min_ops=4, max_ops=4, seed=3)
    assert all(q.meta["num_ops"] == 4 for q in hard)
    # the first N of a split are a prefix of a larger draw
    assert load_task("arithmetic", "test", max_samples=10).problems == task.problems[:10]


@pytest.mark.skipif(__import__("os").environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1")
def test_real_offline_load_raises_task_data_error_or_uses_the_cache():
    # With HF_HUB_OFFLINE=1 (tests/conftest.py) the real `datasets` either finds a cached copy or
    # fails; a failure must come out as TaskDataError, never as a raw datasets/hub exception.
    try:
        task = load_task("gsm8k", "test", max_samples=3)
    except TaskDataError as e:
        assert "path=" in str(e)
    else:
        assert len(task) == 3 and all(p.answer for p in task)
