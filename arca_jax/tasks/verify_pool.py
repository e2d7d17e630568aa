"""A persistent pool of math-verify worker processes with per-item hard timeouts.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one hung worker (a task stuck in a
C-level big-integer power never returns, and terminating a worker breaks the whole executor), and with
the 'spawn'/'forkserver' start methods every worker re-imports the caller's ``__main__`` (a training
script that imports JAX would be imported again in each worker). Here each worker is a fresh Python
interpreter started with ``subprocess`` (fork + exec, the same isolation as 'spawn': no JAX thread or
XLA state is inherited, so the pool is safe to create after JAX is initialised) that runs
``_verify_worker.py`` and imports only math-verify.

Per item: the worker arms a soft timer at ``SOFT_FRACTION * timeout_s`` (the item fails, the worker
survives); the parent kills the worker at ``timeout_s`` after dispatch if it still has not answered
(code stuck in C ignores the soft timer) and starts a replacement. A worker that dies while holding an
item is a crash. Timed-out and crashed items are reported, never retried (a deterministic poison item
would otherwise kill worker after worker). Workers run under an address-space limit
(``memory_limit_mb``) and die with the parent (Linux PR_SET_PDEATHSIG, and EOF on their pipe).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
# Runs the worker file without putting its directory on sys.path (it holds a module named "math").
_BOOTSTRAP = ("import sys, runpy; del sys.path[0]; del sys.argv[0]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
SOFT_FRACTION = 0.75
DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_MEMORY_LIMIT_MB = 2048
_MAX_FAILED_STARTS = 3


class VerifyPoolError(RuntimeError):
    """The worker processes cannot be started (for instance math-verify is not installed)."""


@dataclasses.dataclass(frozen=True)
class ItemResult:
    status: str  # "ok" | "timeout" | "crash" | "error"
    value: Any = None


class _Worker:
    def __init__(self, memory_limit_mb: int):
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, WORKER_PATH, str(p2c_r), str(c2p_w),
                 str(int(memory_limit_mb)), str(os.getpid())],
                pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, env=env, close_fds=True)
        except BaseException:
            for fd in (p2c_r, p2c_w, c2p_r, c2p_w):
                os.close(fd)
            raise
        os.close(p2c_r)
        os.close(c2p_w)
        self.send_conn = Connection(p2c_w, readable=False, writable=True)
        self.recv_conn = Connection(c2p_r, readable=True, writable=False)
        self.state = "starting"  # starting | idle | busy | dead
        self.started_at = time.monotonic()
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self):
        if self.state == "dead":
            return
        self.state = "dead"
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for c in (self.send_conn, self.recv_conn):
            try:
                c.close()
            except OSError:
                pass

    def stop(self, grace_s: float = 1.0):
        if self.state == "dead":
            return
        try:
            if self.state != "busy":
                self.send_conn.send(None)
            self.proc.wait(timeout=grace_s if self.state != "busy" else 0.01)
        except Exception:
            pass
        self.kill()


class VerifyPool:
    """Persistent pool of math-verify workers. Thread-safe (calls are serialised); use one per process.

    ``num_workers`` defaults to ``default_num_workers()``. Workers start in the background at
    construction; the first call waits for them (about a second: importing sympy and math-verify).
    """

    def __init__(self, num_workers: int | None = None, *, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.num_workers = int(num_workers) if num_workers else default_num_workers()
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.memory_limit_mb = int(memory_limit_mb)
        self.start_timeout_s = float(start_timeout_s)
        self.pid = os.getpid()
        self.timeouts_total = 0
        self.crashes_total = 0
        self.restarts_total = 0
        self._lock = threading.Lock()
        self._closed = False
        self._failed_starts = 0
        self._fatal: str | None = None
        self._workers = [_Worker(self.memory_limit_mb) for _ in range(self.num_workers)]

    # ------------------------------------------------------------------ public
    def verify_pairs(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[ItemResult]:
        """Decide ``verify(gold, pred)`` for each (gold, pred) pair of answer strings (boxed contents)."""
        return self.run([("verify", g, p) for g, p in pairs], timeout_s)

    def run(self, ops: Sequence[tuple], timeout_s: float) -> list[ItemResult]:
        """Run raw worker ops ``(name, *args)``; see ``_verify_worker.py``. One result per op, in order."""
        if timeout_s is None or not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        with self._lock:
            if self._closed:
                raise VerifyPoolError("the pool is closed")
            if os.getpid() != self.pid:
                raise VerifyPoolError("a VerifyPool cannot be used from a forked child process")
            try:
                return self._run(list(ops), float(timeout_s))
            except BaseException:
                # Interrupted (KeyboardInterrupt, a failed start...): abandon the in-flight items so a
                # later call does not receive their answers.
                if not self._closed:
                    for i, w in enumerate(self._workers):
                        if w.state in ("busy", "dead"):
                            self._replace(i)
                raise

    def close(self):
        """Stop the workers. Safe to call twice; does not wait forever for a call in another thread."""
        acquired = self._lock.acquire(timeout=5.0)
        try:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                if acquired:
                    w.stop()
                else:  # another thread is inside run() (e.g. a daemon thread at exit): just kill
                    w.kill()
        finally:
            if acquired:
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.state != "dead"]

    # ---------------------------------------------------------------- internal
    def _replace(self, i: int):
        self._workers[i].kill()
        self._workers[i] = _Worker(self.memory_limit_mb)
        self.restarts_total += 1

    def _failed_start(self, i: int, why: str):
        self._failed_starts += 1
        if self._failed_starts >= _MAX_FAILED_STARTS:
            for w in self._workers:
                w.kill()
            self._closed = True
            raise VerifyPoolError(
                "math-verify worker processes failed to start %d times (last: %s). Check that "
                "math-verify is installed for %s." % (self._failed_starts, why, sys.executable))
        self._replace(i)

    def _run(self, ops: list[tuple], timeout_s: float) -> list[ItemResult]:
        soft = timeout_s * SOFT_FRACTION
        results: list[ItemResult | None] = [None] * len(ops)
        pending = collections.deque(range(len(ops)))
        remaining = len(ops)
        while remaining:
            now = time.monotonic()
            # Dispatch to idle workers.
            for i, w in enumerate(self._workers):
                if not pending:
                    break
                if w.state != "idle":
                    continue
                job = pending[0]
                op = ops[job]
                try:
                    w.send_conn.send((op[0], soft) + tuple(op[1:]))
                except (OSError, ValueError):  # died while idle: the item never started, keep it
                    self._replace(i)
                    continue
                pending.popleft()
                w.state, w.job, w.deadline = "busy", job, time.monotonic() + timeout_s
            # Wait for any answer, or the nearest deadline.
            active = [w for w in self._workers if w.state in ("starting", "busy")]
            deadlines = [w.deadline if w.state == "busy" else w.started_at + self.start_timeout_s
                         for w in active]
            wait_s = max(0.0, min(min(deadlines, default=now + 0.2), now + 0.2) - time.monotonic())
            ready = set(id(c) for c in wait([w.recv_conn for w in active], timeout=wait_s)) if active else set()
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.state not in ("starting", "busy"):
                    continue
                msg = None
                dead = False
                if id(w.recv_conn) in ready:
                    try:
                        msg = w.recv_conn.recv()
                    except (EOFError, OSError):
                        dead = True
                    except Exception:  # undecodable message: treat as a broken worker
                        dead = True
                elif w.proc.poll() is not None:
                    dead = True
                if w.state == "starting":
                    if msg is not None and msg[0] == "ready":
                        w.state = "idle"
                        self._failed_starts = 0
                    elif msg is not None and msg[0] == "fatal":
                        self._fatal = str(msg[1])
                        self._failed_start(i, self._fatal)
                    elif dead:
                        self._failed_start(i, "exit status %s" % (w.proc.poll(),))
                    elif now > w.started_at + self.start_timeout_s:
                        self._failed_start(i, "no answer within %.0f s" % self.start_timeout_s)
                    continue
                # busy
                job = w.job
                if msg is not None:
                    status, value = msg[0], msg[1]
                    if status == "timeout":
                        self.timeouts_total += 1
                    results[job] = ItemResult(status, value)
                    w.state, w.job = "idle", None
                    remaining -= 1
                elif dead:
                    self.crashes_total += 1
                    results[job] = ItemResult("crash")
                    remaining -= 1
                    self._replace(i)
                elif now >= w.deadline:
                    self.timeouts_total += 1
                    results[job] = ItemResult("timeout")
                    remaining -= 1
                    self._replace(i)
        return results  # type: ignore[return-value]


def default_num_workers() -> int:
    """``$ARCA_VERIFY_WORKERS`` if set, else min(4, max(1, cpu_count // 2))."""
    env = os.environ.get("ARCA_VERIFY_WORKERS")
    if env:
        return max(1, int(env))
    return min(4, max(1, (os.cpu_count() or 2) // 2))


_default_pool: VerifyPool | None = None
_default_lock = threading.Lock()


def get_default_pool() -> VerifyPool:
    """The process-wide pool, created on first use and closed at interpreter exit."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._closed or _default_pool.pid != os.getpid():
            _default_pool = VerifyPool()
        return _default_pool


def shutdown_default_pool():
    global _default_pool
    with _default_lock:
        pool, _default_pool = _default_pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown_default_pool)
