PY ?= python
.PHONY: install test test-all bench

install:
	$(PY) -m pip install -e ".[test]"

# The test command (README and .ci/run): every test except those marked slow.
test:
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# Every test, the slow tier included (multi-process runs, SIGKILL/SIGTERM, the notebook, further
# mesh shapes): before a release and after changes to the trainer, parallel or checkpoint code.
test-all:
	$(PY) -m pytest -q -n 2 tests

bench:
	$(PY) experiments/bench_sampling.py
