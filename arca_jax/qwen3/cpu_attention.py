"""The masked attention as a C++ kernel on CPU (an XLA FFI custom call): the same values as
`einsum_attention.masked_attention`, computed only over the key tiles a query can see.

The einsum attention computes every score of its query blocks, then masks; a packed line of
the train step (`arca_jax.packing`) holds a shared prompt and several completions, each seeing
the prompt and itself, so most of those scores are masked (the demo's batch: 227,000 visible
pairs of 1.6 million, 21% of the 16-key tiles hold any). The kernel (`csrc/packed_attention.cc`)
visits the tiles with a visible key only, 16 keys per vector, one (line, kv head) per task on
XLA's CPU thread pool. The forward takes a position's G query heads together (one mask row, each
key and value row loaded once for them, their outputs in registers); the backward recomputes the
probabilities from each query's log-sum-exp and runs over key tiles, summing a tile's key and
value gradients over chunks of the rows that see it before writing them. Against the einsum
attention on the demo's packed batch (2-core Xeon) the first version of the kernel took the ARCA
train step 622 -> 524 ms; the tile-major backward and grouped forward took one layer's forward
15.5 -> 5.7 ms and backward 48.7 -> 14.8 ms on one thread (`experiments/cpu_attention/
kernel_ab.py`), the ARCA step 710 -> 627 ms (`experiments/NOTES_vs_trl.md`).

It is built on first use with the host's C++ compiler (`$CXX`, else g++; -O3 -march=native) into
`$XDG_CACHE_HOME/arca-jax/kernels` (default ~/.cache/arca-jax/kernels), one file per source,
compiler, jaxlib and CPU, written atomically (concurrent processes may both build; one file
wins). Without a compiler, or with `ARCA_JAX_CPU_ATTENTION=0`, `available()` is False and the
model runs the einsum attention.

    if cpu_attention.available():
        out = cpu_attention.attention(q, k, v, visible)   # head-major, float32

Dimension letters as in `arca_jax.qwen3` (S: key slots).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp

from arca_jax import hostinfo

ENV = "ARCA_JAX_CPU_ATTENTION"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "packed_attention.cc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17", "-w")
_FWD, _BWD = "arca_packed_attention_fwd", "arca_packed_attention_bwd"
_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "error": why not
log = logging.getLogger(__name__)


def kernel_dir(environ=os.environ) -> str:
    """$XDG_CACHE_HOME/arca-jax/kernels (default ~/.cache/arca-jax/kernels)."""
    return hostinfo.cache_dir("kernels", environ)


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


@functools.lru_cache(maxsize=None)
def _library_path() -> str:
    """The built kernel's path for this source, compiler, jaxlib and CPU (computed once per
    process: it reads the source, /proc/cpuinfo and runs the compiler's --version)."""
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = "none"
    import jaxlib
    for part in (version, " ".join(FLAGS), jaxlib.__version__, hostinfo.cpu_model()):
        h.update(part.encode())
    return os.path.join(kernel_dir(), f"packed_attention-{h.hexdigest()[:16]}.so")


def _build(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=600)
        os.replace(tmp, path)  # atomic: a concurrent build's file or ours, whole
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.ArcaPackedAttentionFwd),
                                platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.ArcaPackedAttentionBwd),
                                platform="cpu")


def available(build: bool = True) -> bool:
    """Whether the kernel is registered with XLA in this process: loads the built library, or
    builds it first (`build`; False: only one built before, as a stored program's load needs).
    False when turned off (`ARCA_JAX_CPU_ATTENTION=0`) or when it cannot be built (`error()`
    says why; logged once)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
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
        except Exception as e:  # noqa: BLE001 - no compiler, a failed build: the einsum path
            detail = getattr(e, "stderr", "") or ""
            _state.update(ok=False, error=f"{type(e).__name__}: {e} {detail[-2000:]}".strip())
            log.warning("the CPU attention kernel is not available (%s); the einsum attention "
                        "runs instead", _state["error"][:500])
        return _state["ok"]


def error() -> Optional[str]:
    """Why `available()` is False after a failed build, else None."""
    return _state.get("error")


def _forward_call(q, k, v, visible):
    B, K, G, T, H = q.shape
    return jax.ffi.ffi_call(_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                   jax.ShapeDtypeStruct((B, K, G, T), jnp.float32)),
                            vmap_method="sequential")(q, k, v, visible)


@jax.custom_vjp
def attention(q, k, v, visible):
    """softmax(q k^T / sqrt(H) where visible) v, head-major, float32: q [B, K, G, T, H], k and v
    [B, K, S, H], visible [B, T, S] bool -> [B, K, G, T, H]; a query that sees nothing averages
    every slot (`masked_attention`'s values, up to float rounding). Needs `available()`."""
    return _forward_call(q, k, v, visible)[0]


def _attention_fwd(q, k, v, visible):
    out, lse = _forward_call(q, k, v, visible)
    return out, (q, k, v, visible, out, lse)


def _attention_bwd(res, dout):
    q, k, v, visible, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_BWD, shapes, vmap_method="sequential")(
        q, k, v, visible, out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
