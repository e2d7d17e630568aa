"""Multi-process (multi-host) runs: starting JAX's distributed runtime and the few host-side
collectives the training program needs.

Every host runs the same program; `initialize` joins them into one JAX runtime, after which
`jax.devices()` lists the devices of all hosts and the "mesh" train step runs on one global mesh.

Where the settings come from (the first that applies):
  1. explicit arguments (`arca-jax train --coordinator-address --num-processes --process-id`);
  2. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. torchrun-style MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK (WORLD_SIZE > 1);
  4. SLURM (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1): JAX's own detection;
  5. a Cloud TPU VM whose slice has several hosts: `jax.distributed.initialize()` with no
     arguments (JAX reads the workers from the TPU VM metadata).
Otherwise the run is single-process and nothing is initialised (mode "auto"; "on" insists on a
distributed start, "off" never starts one).

Failures end in bounded time rather than a hang:
  - an unreachable coordinator: processes other than 0 probe its TCP port before calling JAX and
    raise `DistributedError` after `initialization_timeout` seconds with the address they tried;
    process 0 (and a coordinator that answers but never sees every process) is ended by JAX
    itself after `initialization_timeout` (DEADLINE_EXCEEDED ... RegisterTask);
  - a process that dies (killed, OOM, machine lost): JAX's coordination service notices the
    missing heartbeats and terminates every other process within `heartbeat_timeout` seconds
    (at once when the dead process is process 0, which hosts the service). The message is JAX's
    "Terminating process because the JAX distributed service detected fatal errors";
  - a process that stays alive but stops making progress (a stuck file system, a collective
    that one host never reaches): the optional `Watchdog` ends the process after a timeout.
Checkpoints are written atomically (see `arca_jax.checkpoint`), so whatever ends a run, the last
complete checkpoint stays loadable.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from arca_jax.configlib import ConfigError

MODES = ("auto", "on", "off")
# JAX's defaults: 300 s to connect, 100 s without heartbeats before a process counts as dead.
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
EXIT_WATCHDOG = 4


class DistributedError(ConfigError):
    """The distributed runtime cannot be started as asked (bad settings, no coordinator); the
    CLI reports it in one line with exit code 2, like other bad input."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to start the distributed runtime (None: from the environment, see the module doc)."""

    mode: str = "auto"
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[Tuple[int, ...]] = None
    initialization_timeout: int = DEFAULT_INIT_TIMEOUT_S
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    def __post_init__(self):
        if self.mode not in MODES:
            raise DistributedError(f"distributed mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.initialization_timeout < 1 or self.heartbeat_timeout < 1:
            raise DistributedError("initialization and heartbeat timeouts must be >= 1 second")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do. source: "none" (single process), "explicit", "env",
    "torchrun", "slurm", "ompi" or "tpu" (the last three let JAX detect the values)."""

    source: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.source != "none"


def _int(value, name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _cloud_tpu_process_count() -> int:
    """Hosts of this Cloud TPU slice (or slices), from the TPU VM's metadata as JAX reads it; 0
    when not on a Cloud TPU VM or when its metadata names no workers."""
    try:  # private JAX modules: any failure means "not detected"
        from jax._src import cloud_tpu_init
        if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
            return 0
        from jax._src.clusters import cloud_tpu_cluster as ctc
        for cls in (ctc.GkeTpuCluster, ctc.GceTpuCluster):
            if cls.is_env_present():
                return int(cls.get_process_count())
    except Exception:  # noqa: BLE001 - detection only
        return 0
    return 0


def resolve(settings: Settings, environ: Optional[Mapping[str, str]] = None,
            tpu_processes: Optional[int] = None) -> Plan:
    """Decides where the coordinator address / process count / process id come from: a function
    of the settings, the environment and (tpu_processes; None: detected) the hosts of a Cloud
    TPU slice, which is only looked up when nothing else applies."""
    env = os.environ if environ is None else environ
    if settings.mode == "off":
        return Plan("none")
    addr = settings.coordinator_address
    n = settings.num_processes
    pid = settings.process_id
    source = "explicit" if any(v is not None for v in (addr, n, pid)) else None
    if addr is None and env.get("JAX_COORDINATOR_ADDRESS"):
        addr, source = env["JAX_COORDINATOR_ADDRESS"], source or "env"
    if n is None and env.get("JAX_NUM_PROCESSES"):
        n, source = _int(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES"), source or "env"
    if pid is None and env.get("JAX_PROCESS_ID"):
        pid, source = _int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID"), source or "env"
    if source is None:
        world = _int(env.get("WORLD_SIZE"), "WORLD_SIZE")
        if world is not None and world > 1 and env.get("MASTER_ADDR") and env.get("RANK"):
            port = env.get("MASTER_PORT", "29500")
            return _checked(Plan("torchrun", f"{env['MASTER_ADDR']}:{port}", world,
                                 _int(env["RANK"], "RANK")))
        slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
        if (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1 and all(v in env for v in slurm):
            return Plan("slurm")  # inside an srun step of several tasks
        if (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
            return Plan("ompi")
        tpu = _cloud_tpu_process_count() if tpu_processes is None else tpu_processes
        if tpu > 1 or (tpu == 1 and settings.mode == "on"):
            return Plan("tpu", num_processes=tpu)
        if settings.mode == "on":
            raise DistributedError(
                "a distributed start was asked for, but no coordinator address, process count "
                "and process id were given (--coordinator-address, --num-processes, "
                "--process-id or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) "
                "and no SLURM, Open MPI or Cloud TPU environment was found")
        return Plan("none")
    missing = [flag for flag, v in (("--coordinator-address / JAX_COORDINATOR_ADDRESS", addr),
                                    ("--num-processes / JAX_NUM_PROCESSES", n),
                                    ("--process-id / JAX_PROCESS_ID", pid)) if v is None]
    if missing:
        raise DistributedError(f"a multi-process start needs {', '.join(missing)} as well")
    if n == 1 and settings.mode == "auto":
        return Plan("none")
    return _checked(Plan(source, addr, n, pid))


def _checked(plan: Plan) -> Plan:
    if plan.num_processes is not None and plan.num_processes < 1:
        raise DistributedError(f"the process count must be >= 1, got {plan.num_processes}")
    if plan.process_id is not None and not 0 <= plan.process_id < (plan.num_processes or 1):
        raise DistributedError(f"the process id must be in [0, {plan.num_processes}), got "
                               f"{plan.process_id}")
    if plan.coordinator_address is not None:
        split_address(plan.coordinator_address)
    return plan


def split_address(address: str) -> Tuple[str, int]:
    """"host:port" or "[v6 address]:port" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Retries a TCP connection to the coordinator until it answers; DistributedError after
    `timeout_s` seconds."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last: Optional[BaseException] = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(left, 0.1))):
                return
        except OSError as e:
            last = e
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
    raise DistributedError(
        f"cannot reach the coordinator at {address} within {timeout_s:g} s ({last}); check that "
        "process 0 is running and listening there, the address and port (every process must "
        "pass the same --coordinator-address: process 0's host), and firewalls")


def _log(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} arca-jax distributed: {text}\n")
    sys.stderr.flush()


def initialize(settings: Settings = Settings(), environ: Optional[Mapping[str, str]] = None) -> Plan:
    """Starts JAX's distributed runtime as `resolve` decides (a no-op for a single process or
    when it is already started). Call it before anything touches a JAX device."""
    import jax

    plan = resolve(settings, environ)
    if not plan.active or jax.distributed.is_initialized():
        return plan
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise DistributedError("the distributed runtime must start before JAX touches a device "
                               "(call arca_jax.distributed.initialize first)")
    kwargs = dict(initialization_timeout=int(settings.initialization_timeout),
                  heartbeat_timeout_seconds=int(settings.heartbeat_timeout))
    if settings.local_device_ids is not None:
        kwargs["local_device_ids"] = list(settings.local_device_ids)
    if plan.coordinator_address is not None:
        kwargs.update(coordinator_address=plan.coordinator_address,
                      num_processes=plan.num_processes, process_id=plan.process_id)
        who = f"process {plan.process_id} of {plan.num_processes}"
        if plan.process_id != 0:
            _log(f"{who}: waiting up to {settings.initialization_timeout} s for the coordinator "
                 f"at {plan.coordinator_address}")
            t0 = time.monotonic()
            wait_for_coordinator(plan.coordinator_address, settings.initialization_timeout)
            left = settings.initialization_timeout - (time.monotonic() - t0)
            kwargs["initialization_timeout"] = max(int(left), 10)
        else:
            _log(f"{who}: starting the coordinator at {plan.coordinator_address}; waiting up to "
                 f"{settings.initialization_timeout} s for all {plan.num_processes} processes")
    else:
        _log(f"starting from the {plan.source} environment (JAX detects the coordinator)")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # e.g. an environment JAX cannot read
        raise DistributedError(f"cannot start JAX's distributed runtime ({plan.source} "
                               f"settings): {e}") from None
    _log(f"process {jax.process_index()} of {jax.process_count()} connected: "
         f"{jax.local_device_count()} local of {jax.device_count()} devices; a process that dies "
         f"ends the others within {settings.heartbeat_timeout} s")
    return plan


def process_count() -> int:
    import jax
    return jax.process_count()


def is_multiprocess() -> bool:
    return process_count() > 1


# --------------------------------------------------------------------------------------------
# Host-side agreement (no-ops on one process)
# --------------------------------------------------------------------------------------------


def allgather(tree: Any) -> Any:
    """Each leaf (numpy, same shape on every process) stacked over processes: [n_proc, ...]."""
    import jax
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)
    from jax.experimental import multihost_utils
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any."""
    return bool(np.any(allgather(np.asarray([bool(flag)], np.int32))))


def sum_over_processes(value: float) -> float:
    return float(np.sum(allgather(np.asarray([value], np.float64))))


def broadcast_text(text: Optional[str], limit: int = 4096) -> Optional[str]:
    """Process 0's `text` (None allowed) on every process."""
    import jax
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    raw = b"" if text is None else text.encode()[:limit]
    buf = np.zeros(limit + 1, np.int32)
    buf[0] = -1 if text is None else len(raw)
    buf[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int(out[0])
    return None if n < 0 else bytes(out[1:1 + n].astype(np.uint8)).decode(errors="replace")


def barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------
# Watchdog
# --------------------------------------------------------------------------------------------


class Watchdog:
    """Ends the process (exit code 4) when `beat` has not been called for `timeout_s` seconds:
    the guard against a hang that JAX's heartbeats cannot see (every process alive, one stuck).
    timeout_s <= 0 or None: disabled. Use as a context manager."""

    def __init__(self, timeout_s: Optional[float], what: str = "training"):
        self.timeout_s = float(timeout_s or 0)
        self.what = what
        self._last = time.monotonic()
        self._phase = "start"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, phase: str = "") -> None:
        self._last = time.monotonic()
        self._phase = phase or self._phase

    def _run(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                import jax
                sys.stderr.write(
                    f"\narca-jax: watchdog: no {self.what} progress for {idle:.0f} s (limit "
                    f"{self.timeout_s:g} s) after '{self._phase}' on process "
                    f"{jax.process_index()} of {jax.process_count()}; another process may be "
                    "stuck or gone. Exiting; resume from the last checkpoint with --resume.\n")
                sys.stderr.flush()
                os._exit(EXIT_WATCHDOG)

    def __enter__(self):
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="arca-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def parse_device_ids(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    if text is None or text == "":
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise DistributedError(f"local device ids must be comma-separated integers, got {text!r}") from None


def settings_from_args(mode: str = "auto", coordinator_address: Optional[str] = None,
                       num_processes: Optional[int] = None, process_id: Optional[int] = None,
                       local_device_ids: Optional[str] = None,
                       init_timeout: Optional[int] = None,
                       heartbeat_timeout: Optional[int] = None) -> Settings:
    return Settings(mode=mode, coordinator_address=coordinator_address,
                    num_processes=num_processes, process_id=process_id,
                    local_device_ids=parse_device_ids(local_device_ids),
                    initialization_timeout=DEFAULT_INIT_TIMEOUT_S if init_timeout is None else init_timeout,
                    heartbeat_timeout=(DEFAULT_HEARTBEAT_TIMEOUT_S if heartbeat_timeout is None
                                       else heartbeat_timeout))


__all__ = ["Settings", "Plan", "DistributedError", "resolve", "initialize", "allgather",
           "any_process", "sum_over_processes", "broadcast_text", "barrier", "Watchdog",
           "wait_for_coordinator", "split_address", "is_multiprocess", "process_count",
           "EXIT_WATCHDOG"]
