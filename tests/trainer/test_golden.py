"""The embedded demo and the sampler give the outputs recorded before the consolidation
(tests/trainer/golden_demo.py): identical tokens, rewards and evaluations, metrics equal up to rounding."""

import json

import numpy as np
import pytest

import golden_demo


@pytest.fixture(scope="module")
def golden():
    with open(golden_demo.GOLDEN) as f:
        return json.load(f)


def _close(a, b, path=""):
    """Recursive equality: ints/strings/bools exact, floats within 1e-5 relative."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in b:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a is not None and np.isclose(a, b, rtol=1e-5, atol=2e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_sampler_tokens_unchanged(golden):
    got = golden_demo.sampler_tokens()
    for name, want in golden["sampler"].items():
        assert got[name]["tokens"] == want["tokens"], name
        assert got[name]["mask"] == want["mask"], name
        np.testing.assert_allclose(got[name]["logps"], want["logps"], atol=2e-5, err_msg=name)


def test_demo_run_unchanged(golden):
    _close(golden_demo.demo_run(), golden["demo"])
