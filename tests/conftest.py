"""Test-wide settings: CPU only, 8 forced host devices (for the pmap/mesh tests), float32 matmuls
exact; and tests/ on sys.path, so that every test folder imports the shared builders with
``from fixtures import ...`` (tests/fixtures.py)."""
import atexit
import gc
import os
import shutil
import sys
import tempfile

CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
TEST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# XLA's CPU collectives end the process (SIGABRT) when the 8 device threads do not all reach a
# collective within 40 s, which a loaded 2-core machine can exceed; a hang is still caught, later.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += " " + CPU_COLLECTIVE_TIMEOUT_FLAG
# The tests compile thousands of small programs, each run once or twice. Without LLVM's
# optimisation passes and with XLA's older elemental loop emitter instead of its fusion emitters,
# a program compiles 2-4x faster (a token-weighting program: 1.2 s -> 0.3 s; test_credit.py
# 250 -> 116 s); the programs compute the same functions (the oracles' tolerances hold).
# ARCA_JAX_TEST_XLA_OPT=1 keeps XLA's defaults.
if os.environ.get("ARCA_JAX_TEST_XLA_OPT", "0") != "1":
    for flag in TEST_COMPILE_FLAGS:
        if flag.split("=")[0] not in _flags:
            _flags += " " + flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the whole run, fresh each run: the test processes (both
# xdist workers inherit the directory from the controller) and the trainer subprocesses they
# start load a program another test already compiled instead of compiling it again.
# tests/trainer/test_compilation_cache.py checks the cache itself with directories of its own.
if "ARCA_JAX_TEST_COMPILATION_CACHE" not in os.environ:
    os.environ["ARCA_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="arca-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["ARCA_JAX_TEST_COMPILATION_CACHE"], True)
os.environ["ARCA_JAX_COMPILATION_CACHE"] = os.environ["ARCA_JAX_TEST_COMPILATION_CACHE"]
# the trainer's stored train steps (`train.store_programs`) likewise, never the user's cache
if "ARCA_JAX_PROGRAM_STORE" not in os.environ:
    os.environ["ARCA_JAX_PROGRAM_STORE"] = tempfile.mkdtemp(prefix="arca-jax-test-steps-")
    atexit.register(shutil.rmtree, os.environ["ARCA_JAX_PROGRAM_STORE"], True)
# Only programs that take a second or more to compile are shared: the tests also run thousands of
# small eager programs, and every write to the (bounded, locked) cache lists the whole directory,
# which made the writes most of the suite's time once the directory held thousands of entries.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
from arca_jax.trainer import setup as _setup  # noqa: E402

_setup.use_compilation_cache()  # the CLI's own switch, on the directory above


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module: drop JAX's compiled programs and traces. An xdist worker otherwise
    keeps every program it ever compiled (several GB by the end of the suite), and two such
    workers plus the multi-process tests' subprocesses have exhausted a 24 GB machine."""
    yield
    jax.clear_caches()
    gc.collect()
