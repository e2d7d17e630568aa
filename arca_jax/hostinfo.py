"""What this host is, for the files kept per user and per machine: the cache directory and the
CPU model (compiled programs and the CPU attention kernel are keyed by it)."""

from __future__ import annotations

import os
import platform


def cache_dir(kind: str, environ=os.environ) -> str:
    """$XDG_CACHE_HOME/arca-jax/`kind` (default ~/.cache/arca-jax/`kind`)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arca-jax", kind)


def cpu_model() -> str:
    """The first CPU's "model name" and "flags" lines of /proc/cpuinfo (`platform.processor()`
    where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join([ln for ln in f if ln.startswith(("model name", "flags"))][:2])
    except OSError:
        return platform.processor()
