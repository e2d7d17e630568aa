"""Worker process for :class:`arca_jax.tasks.verify_pool.VerifyPool`.

This file is run as a fresh interpreter (``python -c 'runpy.run_path(...)' <this file> ...``), never
imported by the parent, and deliberately imports nothing from ``arca_jax``: only the standard library
and math-verify. A fresh interpreter (fork + exec, like multiprocessing's 'spawn') inherits no JAX
threads or XLA state from the parent and, unlike multiprocessing's spawn/forkserver, does not re-import
the parent's ``__main__`` module.

Protocol (pickled messages over two pipes given as file descriptors on the command line):
  parent -> worker: ``(op, soft_timeout_s, *args)`` or ``None`` (exit).
  worker -> parent: ``("ready", pid)`` once, then one ``(status, value)`` per request, where status is
  "ok" (value: the result), "timeout" (the soft timer fired) or "error" (value: a short repr).

Time limits: each request runs under a soft ``setitimer`` alarm that raises a ``BaseException``
subclass (math-verify's own ``except Exception`` handlers cannot swallow it). Code stuck inside a C
call (for instance a huge integer power) cannot be interrupted that way; the parent then kills the
process at its hard deadline and starts a replacement. math-verify's own signal.alarm timeouts are
disabled (they would cancel our timer).

Ops: "verify" (gold answer, predicted answer) -> bool. For tests of the pool's failure handling only:
"_sleep" (seconds; interruptible), "_hang" (seconds with SIGALRM blocked: only a kill ends it) and
"_crash" (the process exits at once).
"""
import os
import signal
import sys
import time


class _SoftTimeout(BaseException):
    pass


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    raise _SoftTimeout()


def _set_parent_death_signal():
    """Linux: get SIGKILL when the parent dies, so an orphan stuck in C code does not spin forever."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv):
    # One function on purpose: the worker's whole life (limits, imports, the request loop and its
    # error replies) reads top to bottom in the order it happens; its parts share local state.
    from multiprocessing.connection import Connection

    rfd, wfd, mem_mb, parent_pid = (int(a) for a in argv[:4])
    conn_in = Connection(rfd, readable=True, writable=False)
    conn_out = Connection(wfd, readable=False, writable=True)

    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if mem_mb > 0:
        try:
            import resource

            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except Exception:
            pass

    try:
        import logging

        from math_verify import LatexExtractionConfig, parse, verify

        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        config = [LatexExtractionConfig()]

        def check(gold, pred):
            g = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
            p = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
            return bool(verify(g, p, timeout_seconds=None))

        check("\\frac{1}{2}", "0.5")  # warm-up: lazy imports, parser construction
    except BaseException as e:  # noqa: BLE001
        try:
            conn_out.send(("fatal", "%s: %s" % (type(e).__name__, e)))
        except Exception:
            pass
        return 1

    signal.signal(signal.SIGALRM, _on_alarm)
    conn_out.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return 0
        if msg is None:
            return 0
        try:
            op, soft_timeout_s = msg[0], float(msg[1])
            try:
                if soft_timeout_s > 0:
                    signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
                if op == "verify":
                    value = check(msg[2], msg[3])
                elif op == "_sleep":
                    time.sleep(float(msg[2]))
                    value = True
                elif op == "_hang":
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    try:
                        time.sleep(float(msg[2]))
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
                    value = True
                elif op == "_crash":
                    os._exit(70)
                else:
                    raise ValueError("unknown op %r" % (op,))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = ("ok", value)
        except _SoftTimeout:
            reply = ("timeout", None)
        except BaseException as e:  # noqa: BLE001 - MemoryError, RecursionError, anything from sympy
            try:
                reply = ("error", type(e).__name__)
            except BaseException:  # noqa: BLE001
                reply = ("error", "?")
        try:
            conn_out.send(reply)
        except (OSError, ValueError):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
