"""The math-verify worker pool: timeouts and crashes are counted, hung workers are replaced,
and it is safe to use with JAX initialised in the parent."""
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax.tasks import math as mr
from arca_jax.tasks import verify_pool as vp


@pytest.fixture(scope="module")
def pool():
    p = vp.VerifyPool(2)
    yield p
    p.close()


def test_soft_timeout_keeps_the_worker(pool):
    pool.run([("_sleep", 0.0)] * 2, timeout_s=60)  # wait until both workers are up
    pids = sorted(pool.worker_pids())
    restarts = pool.restarts_total
    t0 = time.perf_counter()
    res = pool.run([("_sleep", 30.0), ("_sleep", 0.01)], timeout_s=0.5)
    assert time.perf_counter() - t0 < 20.0  # at the 0.5 s timeout, not after the 30 s sleep
    assert [r.status for r in res] == ["timeout", "ok"]
    assert sorted(pool.worker_pids()) == pids and pool.restarts_total == restarts


def test_hung_worker_is_killed_and_replaced(pool):
    pool.run([("_sleep", 0.0)] * 2, timeout_s=60)
    before = set(pool.worker_pids())
    timeouts = pool.timeouts_total
    t0 = time.perf_counter()
    # "_hang" blocks SIGALRM: only the parent's hard kill ends it.
    res = pool.run([("_hang", 60.0), ("_sleep", 0.01), ("_sleep", 0.01)], timeout_s=0.5)
    assert time.perf_counter() - t0 < 30.0  # killed at the timeout, not after the 60 s hang
    assert [r.status for r in res] == ["timeout", "ok", "ok"]
    assert pool.timeouts_total == timeouts + 1
    after = set(pool.worker_pids())
    assert len(after) == 2 and len(after - before) == 1
    killed = (before - after).pop()
    with pytest.raises(OSError):  # the hung process is gone (reaped)
        os.kill(killed, 0)
    assert mr.reward(r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", mode="verify", pool=pool) == 1.0


def test_crash_is_counted_and_not_retried(pool):
    crashes = pool.crashes_total
    res = pool.run([("_crash",), ("_sleep", 0.01), ("_crash",)], timeout_s=5.0)
    assert [r.status for r in res] == ["crash", "ok", "crash"]
    assert pool.crashes_total == crashes + 2
    assert len(pool.worker_pids()) == 2


def test_score_batch_counts_timeouts(pool):
    towers = [r"\boxed{10^{10^{10^{10}}}}", r"\boxed{9^{9^{9^{9}}}}"]
    comps = towers + [r"\boxed{0.5}", r"\boxed{7}"]
    res = mr.score_batch(comps, [r"\boxed{\frac{1}{2}}"] * 4, mode="verify", timeout_s=1.0, pool=pool)
    np.testing.assert_array_equal(res.rewards, [0, 0, 1, 0])
    assert res.timeouts + res.crashes == 2


def test_pool_after_jax_is_initialised():
    # JAX runs threads in this process; the workers are fresh interpreters (fork + exec), not forks.
    assert float(jnp.sum(jnp.arange(10.0))) == 45.0
    with vp.VerifyPool(1) as p:
        res = mr.score_batch([r"\boxed{3,\!000}"], [r"\boxed{3000}"], mode="verify", pool=p)
        assert res.rewards[0] == 1.0
    assert p.worker_pids() == []


def test_closed_pool_and_bad_timeout():
    p = vp.VerifyPool(1)
    with pytest.raises(ValueError):
        p.run([("_sleep", 0.0)], timeout_s=0)
    p.close()
    with pytest.raises(vp.VerifyPoolError):
        p.run([("_sleep", 0.0)], timeout_s=1)


def test_workers_that_cannot_start_raise(monkeypatch, tmp_path):
    bad = tmp_path / "bad_worker.py"
    bad.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(vp, "WORKER_PATH", str(bad))
    p = vp.VerifyPool(1)
    t0 = time.perf_counter()
    with pytest.raises(vp.VerifyPoolError, match="math-verify"):
        p.verify_pairs([("1", "1")], timeout_s=1.0)
    assert time.perf_counter() - t0 < 30.0


def test_default_pool_is_shared_and_recreated():
    a = vp.get_default_pool()
    assert vp.get_default_pool() is a
    vp.shutdown_default_pool()
    b = vp.get_default_pool()
    assert b is not a
    assert mr.reward(r"\boxed{0.5}", r"\boxed{\frac12}", mode="verify") == 1.0
    vp.shutdown_default_pool()


def test_default_num_workers(monkeypatch):
    monkeypatch.setenv("ARCA_VERIFY_WORKERS", "3")
    assert vp.default_num_workers() == 3
    monkeypatch.delenv("ARCA_VERIFY_WORKERS")
    assert 1 <= vp.default_num_workers() <= 4
