PY ?= python
.PHONY: install test test-fast bench

install:
	$(PY) -m pip install -e ".[test]"

# The test command (README and .ci/run).
test:
	$(PY) -m pytest -q -n 2 tests

bench:
	$(PY) experiments/bench_sampling.py
