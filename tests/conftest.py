"""Test-wide settings: CPU only, 8 forced host devices (for the pmap/mesh tests), float32 matmuls
exact; and tests/ on sys.path, so that every test folder imports the shared builders with
``from fixtures import ...`` (tests/fixtures.py)."""
import os
import sys

CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
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
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI's persistent compilation cache stays off in tests (each test compiles what it checks);
# tests/trainer/test_compilation_cache.py turns it on where it is the subject.
os.environ["ARCA_JAX_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
