"""`arca_jax.host_memory`: glibc's malloc set to reuse freed memory, where JAX runs on the CPU
only and before its backends start. A jitted program whose temporaries exceed glibc's mmap
threshold page-faults them in at every call unless set (counted in a fresh process); the
compiler's freed memory is handed back after each compile."""

import os
import subprocess
import sys

import pytest

from arca_jax import host_memory

PROGRAM = r"""
import resource, sys
from arca_jax import host_memory
applied = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(a):  # temporaries: [3000, 3000] float32 buffers of 36 MB (glibc mmaps above 32 MB)
    b = jnp.tanh(a @ a)
    return (jnp.exp(b) @ a * 2).sum()

a = jnp.ones((3000, 3000), jnp.float32)
f(a).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    f(a).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 2)
"""


def _run(choice: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{host_memory.ENV: choice})
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    applied, faults = _run("")
    off_applied, off_faults = _run("0")
    assert applied and not off_applied
    if off_faults < 50_000:  # e.g. transparent huge pages "always": 2 MiB faults, few of them
        pytest.skip(f"{off_faults} faults per call without the setting: this kernel does not "
                    "fault the temporaries in 4 KiB pages, nothing to compare")
    # off: each call faults its temporaries in (~436,000 4 KiB pages); on: they stay mapped
    assert faults < off_faults / 10, (faults, off_faults)


def test_not_applied_once_jax_has_started():
    import jax

    jax.devices()  # this process's backends exist (threads with arenas of their own)
    assert host_memory.backends_started()
    assert not host_memory._applied
    assert host_memory.reuse_freed_memory({host_memory.ENV: "1"}) is False


def test_cpu_only(monkeypatch):
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: True)
    assert host_memory.cpu_only("cpu")
    assert not host_memory.cpu_only("cuda")
    assert not host_memory.cpu_only("cpu,tpu")
    assert not host_memory.cpu_only("")  # a plugin installed, no platform named
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: False)
    assert host_memory.cpu_only("")
    assert not host_memory.cpu_only("tpu")


COMPILE = r"""
import resource
from arca_jax import host_memory
assert host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6

x = jnp.ones((64, 64))
jax.jit(lambda a: a + 1)(x).block_until_ready()

def f(a):  # a program of ~200 operations: the compiler's memory, then freed
    for i in range(40):
        a = jnp.tanh(a @ a.T * (i + 1)) + jnp.roll(a, i, axis=0)
    return a

trims, before = host_memory.trims, rss()
jax.jit(f).lower(x).compile()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
print(host_memory.trims - trims, before, peak, rss())
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_compiler_memory_is_handed_back_after_a_compile():
    """With freed memory kept for reuse, the compiler's freed blocks would stay resident (about
    60 MB for this program, measured); after each compile they are handed back."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{host_memory.ENV: ""})
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    trims, before, peak, after = map(float, out.stdout.split()[-4:])
    assert trims >= 1
    if peak - before < 20:
        pytest.skip(f"the compile grew resident memory by {peak - before:.0f} MB only")
    assert after - before < 0.5 * (peak - before), (before, peak, after)
