"""Compiled programs on disk, found without tracing (CPU runs): the trainer's packed train steps
and the sampler's programs.

JAX's persistent compilation cache keys a program by its lowered module, so a new process still
traces and lowers the train step before it can load it: 0.6 s of the demo's first step with
cached programs (tracing 0.45 s, lowering 0.17 s, loading 0.22 s; experiments/NOTES_vs_trl.md).
`ExecutableStore` keys a compiled program by what determines it instead: a digest of the
caller's `static` text (for the train step: model and objective configs, optimiser settings,
...) and static arguments, of this package's source, of jax's version, options, flags and
backend, and of the arguments' abstract signature (tree structure, shapes, dtypes, shardings).
A hit loads the serialized executable (`jax.experimental.serialize_executable`) and runs it; a
miss compiles as before and, when the executable was compiled by this call (not taken from
JAX's persistent or in-memory caches: an executable loaded from the persistent cache serializes
without its kernels on XLA:CPU, so one that came from there is compiled once more under another
key, `FRESH`), writes it for the next run.

Programs whose arguments all lie on one device, or all on the same devices (the sampler's
replicas, `arca_jax.replicas`), the devices' order kept; at most `MAX_ENTRIES` files, the least
recently used removed first. Entries are written atomically (a temporary file renamed into
place) and read defensively: an entry that does not load is removed and the program compiles.
Never load a store written by someone else: unpickling an executable runs code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from typing import Any, Callable, Dict, Optional

import jax

from arca_jax import hostinfo
from arca_jax.qwen3 import cpu_kernels

SUFFIX = ".jaxexe"
MAX_ENTRIES = 64  # the least recently used beyond these are removed when a new one is written
# An XLA option at its default value: the same program under another persistent-cache key, so a
# program that JAX's cache held (and would hand over without its kernels) compiles afresh.
FRESH = {"xla_embed_ir_in_executable": False}
_source_digest: Optional[str] = None


def source_digest() -> str:
    """sha256 over every .py file of the arca_jax package (path and bytes), computed once."""
    global _source_digest
    if _source_digest is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for d, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
        _source_digest = h.hexdigest()
    return _source_digest


def environment() -> str:
    """What a compiled program depends on besides its inputs: versions, jax's options (global
    values: x64, default matmul precision, ...), XLA flags, the backend and device, the CPU, this
    package's source. Computed when a store is made (options changed later are not seen)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib = version("jaxlib")
    except PackageNotFoundError:
        jaxlib = ""
    d = jax.devices()[0]
    options = repr(sorted((k, repr(v)) for k, v in jax.config.values.items()))  # x64, precision..
    return "\n".join([jax.__version__, jaxlib, sys.version, options,
                      os.environ.get("XLA_FLAGS", ""), d.platform, getattr(d, "device_kind", ""),
                      d.client.platform_version, str(len(jax.devices())), hostinfo.cpu_model(),
                      source_digest()])


def signature(args) -> str:
    """The abstract signature of a call's arguments: tree structure (static fields included),
    and per leaf its shape, dtype, weak type and sharding."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    parts = [str(tree)]
    for x in leaves:
        aval = jax.typeof(x)
        parts.append(f"{aval.str_short(short_dtypes=False)}|{getattr(aval, 'weak_type', '')}|"
                     f"{getattr(x, 'sharding', '')}")
    return "\n".join(parts)


class _Compiles:
    """Counts XLA compilations and JAX persistent-cache hits (jax.monitoring events): a compile
    call during which XLA compiled and the cache did not hit made a fresh executable (an
    executable from JAX's in-memory cache records neither)."""

    backend = hits = 0
    _registered = False

    @classmethod
    def listen(cls) -> None:
        if cls._registered:
            return
        from jax._src import dispatch

        def on_event(event: str, **kwargs) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                cls.hits += 1

        def on_duration(event: str, duration: float, **kwargs) -> None:
            if event == dispatch.BACKEND_COMPILE_EVENT:
                cls.backend += 1

        jax.monitoring.register_event_listener(on_event)
        jax.monitoring.register_event_duration_secs_listener(on_duration)
        cls._registered = True


class ExecutableStore:
    """Compiled programs of one run's static setup under ``directory``, one file per key.

    static: text naming everything the program depends on that its arguments do not show (the
    caller's configs, with their repr); two runs with equal text must build the same program
    for the same arguments."""

    def __init__(self, directory: str, static: str):
        self.directory = directory
        self._base = hashlib.sha256((environment() + "\n" + static).encode()).hexdigest()
        self._loaded: Dict[str, Any] = {}
        self.hits = self.writes = 0
        _Compiles.listen()

    def path(self, name: str, args, kwargs=None, static=None) -> str:
        text = f"{self._base}\n{name}\n{static or {}!r}\n{signature((args, kwargs or {}))}"
        key = hashlib.sha256(text.encode()).hexdigest()
        return os.path.join(self.directory, f"{name}-{key[:40]}{SUFFIX}")

    def compiled(self, name: str, jitted: Callable, args, kwargs=None, static=None) -> Any:
        """The compiled ``jitted`` for ``args`` (a tuple) and array keywords ``kwargs``, its
        static keywords ``static`` (a dict of hashable values with a stable repr: configs, ints,
        strings) bound: from memory, from the store, or compiled (and stored when it was
        compiled, not loaded from JAX's cache). Call it with ``(*args, **kwargs)``."""
        kwargs, static = kwargs or {}, static or {}
        path = self.path(name, args, kwargs, static)
        program = self._loaded.get(path)
        if program is None:
            program = self._load(path)
            if program is None:
                lowered = jitted.lower(*args, **kwargs, **static)
                backend, hits = _Compiles.backend, _Compiles.hits
                program = lowered.compile()
                if _Compiles.hits > hits:  # from JAX's persistent cache: compile it anew once
                    backend, hits = _Compiles.backend, _Compiles.hits
                    program = lowered.compile(compiler_options=FRESH)
                if _Compiles.backend > backend and _Compiles.hits == hits:  # compiled here
                    self._write(path, program)
            self._loaded[path] = program
        return program

    def _prune(self) -> None:
        entries = [os.path.join(self.directory, f) for f in os.listdir(self.directory)
                   if f.endswith(SUFFIX)]
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda p: os.stat(p).st_mtime)
        for p in entries[:len(entries) - MAX_ENTRIES]:
            try:
                os.remove(p)
            except OSError:
                pass

    def _load(self, path: str):
        from jax.experimental import serialize_executable

        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree, ids = pickle.load(f)
            by_id = {d.id: d for d in jax.devices()}
            devices = [by_id[i] for i in ids]
            if devices[0].platform == "cpu":  # a program calling the CPU kernels
                cpu_kernels.available(build=False)  # needs them registered, if built
            program = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=devices)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a damaged or foreign entry: compile instead
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        self.hits += 1
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return program

    def _write(self, path: str, program) -> None:
        from jax.experimental import serialize_executable

        assignments = {tuple(s._device_assignment)
                       for s in jax.tree.leaves(program.input_shardings)}
        if len(assignments) != 1:
            return  # every argument on the same devices only (the order they load in is kept)
        tmp = None
        try:
            ids = tuple(d.id for d in assignments.pop())
            data = pickle.dumps(serialize_executable.serialize(program) + (ids,))
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
            self.writes += 1
            self._prune()
        except Exception:  # noqa: BLE001 - a store that cannot be written: run without it
            pass
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
