"""Host memory for JAX on CPU: glibc's malloc set to reuse freed memory (Linux).

XLA:CPU allocates an executable's temporary buffer at every call and frees it after (one block:
464 MB for the demo's ARCA train step). XLA runs on threads that glibc serves from their own
arenas, and an arena that is not the main one takes any block above its 64 MB heaps from a fresh
`mmap` and unmaps it at `free`; so every call page-faults the whole buffer in again (113,000
faults per call of that step: 0.18 s of kernel time per call, the step 448 -> 386 ms,
experiments/NOTES_vs_trl.md "Freed memory reused"). `reuse_freed_memory` sets glibc's malloc to
one arena, no `mmap` and no trimming (`mallopt`), so a freed buffer stays in the process and the
next call reuses its pages.

The cost: the heap does not shrink by itself (resident memory stays at its peak, which the peak
was anyway). So it is applied only where JAX can run on nothing but the CPU, and only before JAX's
backends start (threads that already have arenas keep them: applied later it changes nothing).

One exception is made for XLA's compiler: it frees hundreds of megabytes of small blocks when a
compile ends, scattered between blocks still in use, where a program's one large temporary buffer
cannot reuse them; kept, they added to the peak (the demo's ARCA run on a fresh cache: peak RSS
1.51 GB, the train step's first call on top of 0.32 GB the compile left). So after each XLA
compile `malloc_trim` hands the free pages back to the kernel (5-50 ms per compile; the same
run's peak 1.20 GB, that of a run loading stored programs).

The trainer's commands (`arca-jax train`, `eval`, `sweep`) call `reuse_freed_memory` first; a
program calling the library directly calls it before its first JAX computation.
`ARCA_JAX_REUSE_HOST_MEMORY=0` turns it off, `=1` applies it even where an accelerator plugin is
installed.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from typing import Optional

ENV = "ARCA_JAX_REUSE_HOST_MEMORY"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False
trims = 0  # malloc_trim calls made after compiles (`_trim_after_compile`)

# the event jax records (with its duration) when XLA has compiled a program
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def accelerator_plugins() -> bool:
    """Whether JAX could find a GPU or TPU backend in this environment: `libtpu`, a `jax_plugins`
    module or entry point (the CUDA / ROCm plugins). Decided without starting JAX."""
    if importlib.util.find_spec("libtpu") is not None or os.environ.get("TPU_LIBRARY_PATH"):
        return True
    if importlib.util.find_spec("jax_plugins") is not None:  # the plugins' namespace package
        return True
    from importlib.metadata import entry_points
    return any(True for _ in entry_points(group="jax_plugins"))


def cpu_only(platforms: Optional[str] = None, environ=os.environ) -> bool:
    """Whether JAX in this process can run on the CPU only: `platforms` (default: jax's
    `jax_platforms` option if jax is imported, else `JAX_PLATFORMS`) names "cpu" alone, or it
    names nothing and no accelerator plugin is installed."""
    if platforms is None:
        jax = sys.modules.get("jax")
        platforms = (jax.config.jax_platforms if jax is not None else None) or environ.get(
            "JAX_PLATFORMS", "")
    names = [p.strip() for p in platforms.split(",") if p.strip()]
    if names:
        return names == ["cpu"]
    return not accelerator_plugins()


def backends_started() -> bool:
    """Whether JAX has created its backends (and with them its threads) in this process."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except Exception:  # noqa: BLE001 - a jax without it: assume started (apply nothing)
        return True


def reuse_freed_memory(environ=os.environ) -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (one arena, no mmap, no trimming) when
    JAX can run on the CPU only and has not started its backends; returns whether it is set
    (also when an earlier call set it). `ARCA_JAX_REUSE_HOST_MEMORY`: "0" never, "1" whatever
    plugins are installed (still only before the backends start and with glibc)."""
    global _applied
    if _applied:
        return True
    choice = environ.get(ENV, "").strip()
    if choice == "0" or backends_started():
        return False
    if choice != "1" and not cpu_only(environ=environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)) == 1)
    if ok:
        import jax.monitoring  # registers a listener only: starts no backend

        jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)
    _applied = ok
    return ok


def _trim_after_compile(event: str, duration: float, **kwargs) -> None:
    """After an XLA compile: hand the free pages of the heap back to the kernel (the compiler's
    freed memory, which a later large buffer cannot reuse; the module's docstring)."""
    global trims
    if event != COMPILE_EVENT:
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
        trims += 1
