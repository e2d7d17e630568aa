"""The package's C++ kernels for XLA's CPU backend (XLA FFI custom calls): one library built
from `csrc/` on first use, whose handlers this module registers with XLA.

  `cpu_attention`  the masked attention of the train step's packed lines (forward, backward);
  `cpu_matmul`     x W for the few rows of a decode step, W packed in column panels;
  `cache_attention.attend_cpu`  a decode step's attention over the filled part of the cache;
  `cpu_layers`     a decode step's decoder layers in one call.

The library is built with the host's C++ compiler (`$CXX`, else g++; -O3 -march=native) into
`$XDG_CACHE_HOME/arca-jax/kernels` (default ~/.cache/arca-jax/kernels), one file per set of
sources, compiler, jaxlib and CPU, written atomically (concurrent processes may both build; one
file wins). Without a compiler, or with `ARCA_JAX_CPU_KERNELS=0`, `available()` is False and the
model runs XLA's own operations instead (the same values up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from typing import Optional

import jax

from arca_jax import hostinfo

ENV = "ARCA_JAX_CPU_KERNELS"
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17", "-w")
# FFI target name -> the handler's symbol in the library
TARGETS = {"arca_packed_attention_fwd": "ArcaPackedAttentionFwd",
           "arca_packed_attention_bwd": "ArcaPackedAttentionBwd",
           "arca_panel_matmul": "ArcaPanelMatmul",
           "arca_pack_panels": "ArcaPackPanels",
           "arca_pack_panels_transposed": "ArcaPackPanelsTransposed",
           "arca_pack_panels_parts": "ArcaPackPanelsParts",
           "arca_decode_attention": "ArcaDecodeAttention",
           "arca_decode_layers": "ArcaDecodeLayers"}
_OFF = ("0", "false", "no", "off")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "error": why not
log = logging.getLogger(__name__)


def kernel_dir(environ=os.environ) -> str:
    """$XDG_CACHE_HOME/arca-jax/kernels (default ~/.cache/arca-jax/kernels)."""
    return hostinfo.cache_dir("kernels", environ)


def sources() -> list:
    """The library's C++ sources (`csrc/*.cc`), sorted."""
    return sorted(glob.glob(os.path.join(SOURCE_DIR, "*.cc")))


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


@functools.lru_cache(maxsize=None)
def _library_path() -> str:
    """The built library's path for these sources (and headers), compiler, flags, jaxlib and
    CPU (computed once per process: it reads the sources, /proc/cpuinfo and runs the compiler's
    --version)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(SOURCE_DIR, "*"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = "none"
    import jaxlib
    for part in (version, " ".join(FLAGS), jaxlib.__version__, hostinfo.cpu_model()):
        h.update(part.encode())
    return os.path.join(kernel_dir(), f"cpu_kernels-{h.hexdigest()[:16]}.so")


def _build(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", *sources(), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=600)
        os.replace(tmp, path)  # atomic: a concurrent build's file or ours, whole
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


def available(build: bool = True) -> bool:
    """Whether the kernels are registered with XLA in this process: loads the built library, or
    builds it first (`build`; False: only one built before, as a stored program's load needs).
    False when turned off (`ARCA_JAX_CPU_KERNELS=0`) or when it cannot be built (`error()` says
    why; logged once)."""
    if os.environ.get(ENV, "1").strip().lower() in _OFF:
        return False
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        try:
            path = _library_path()
            if not os.path.exists(path):
                if not build:
                    return False
                _build(path)
            _register(path)
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - no compiler, a failed build: XLA's operations
            detail = getattr(e, "stderr", "") or ""
            _state.update(ok=False, error=f"{type(e).__name__}: {e} {detail[-2000:]}".strip())
            log.warning("the CPU kernels are not available (%s); XLA's own operations run "
                        "instead", _state["error"][:500])
        return _state["ok"]


def error() -> Optional[str]:
    """Why `available()` is False after a failed build, else None."""
    return _state.get("error")


def usable(dtype, platform: Optional[str] = None) -> bool:
    """Whether the kernels serve activations of `dtype` on `platform` (default: jax's default
    backend): float32 on CPU, where the library is available. The callers' own conditions (no
    mesh, one device) come on top."""
    import jax.numpy as jnp

    return ((platform or jax.default_backend()) == "cpu"
            and jnp.dtype(dtype) == jnp.dtype(jnp.float32) and available())


def require(what: str) -> None:
    """Registers the kernels (`available()`), or raises ValueError naming `what` and why not."""
    if not available():
        raise ValueError(f"{what}: the CPU kernels are not available "
                         f"({error() or ENV + '=0'})")
