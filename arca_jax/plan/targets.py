"""The devices a plan compiles for: chips' published figures, the local devices, and a TPU
slice's compile-only devices from libtpu (`Target`: per-device memory in bytes, peak FLOP/s,
HBM bytes/s)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from typing import Any, Dict, Optional, Tuple

import jax

from arca_jax.plan.errors import PlanError

GiB = 1024 ** 3
INSTALL_HINT = ("pip install 'arca-jax[tpu]' (or: pip install libtpu; or pip install --target DIR "
                "libtpu and pass --libtpu DIR)")
LIBTPU_DIR_ENV = "ARCA_JAX_LIBTPU_DIR"


# --------------------------------------------------------------------------------------------
# Chips
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one chip. hbm_bytes: memory per chip (bytes); peak_flops: dense bf16
    FLOP/s per chip; hbm_bandwidth: bytes/s per chip; link_bandwidth: the chip's inter-chip
    bandwidth in bytes/s, both directions together, as published (TPU ICI, NVLink). None: no
    published figure."""

    name: str
    hbm_bytes: Optional[float]
    peak_flops: Optional[float]
    hbm_bandwidth: Optional[float]
    source: str = ""
    link_bandwidth: Optional[float] = None


CHIPS: Dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "Cloud TPU v4 docs (2 TensorCores per chip; "
                                                   "no per-chip ICI figure)"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "Cloud TPU v5e docs", 400e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "Cloud TPU v5p docs", 1200e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, "Cloud TPU v6e (Trillium) docs", 800e9),
    "h100": Chip("NVIDIA H100 SXM", 80e9, 989e12, 3.35e12,
                 "NVIDIA H100 datasheet (dense bf16; NVLink)", 900e9),
    "h200": Chip("NVIDIA H200 SXM", 141e9, 989e12, 4.8e12,
                 "NVIDIA H200 datasheet (dense bf16; NVLink)", 900e9),
    "cpu": Chip("CPU", None, None, None, "no published peak: memory is the host's RAM shared by "
                                       "its devices; no roofline"),
}
_TPU_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
              "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def chip_of(device) -> Chip:
    """The `CHIPS` entry of a JAX device (by platform and device_kind); an unknown accelerator
    gets a Chip with no figures."""
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "cpu":
        return CHIPS["cpu"]
    if device.platform == "tpu" and kind in _TPU_KINDS:
        return CHIPS[_TPU_KINDS[kind]]
    for key in ("h200", "h100"):
        if key in kind.lower():
            return CHIPS[key]
    return Chip(kind or device.platform, None, None, None, "unknown device: no published figures")


# --------------------------------------------------------------------------------------------
# Targets: the devices to compile for
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for and their figures per device (a chip, or one TensorCore where the
    topology exposes each core as a device: memory and flops are then the chip's share).

    hbm_bytes: memory per device (bytes; None: unknown); peak_flops (FLOP/s) and hbm_bandwidth
    (bytes/s) per device, or None. link_bandwidth: the chip's inter-chip bytes/s
    (`Chip.link_bandwidth`) over its devices, or None."""

    name: str
    platform: str
    devices: Tuple[Any, ...]
    chip: Chip
    chips: int
    hbm_bytes: Optional[float]
    peak_flops: Optional[float]
    hbm_bandwidth: Optional[float]
    link_bandwidth: Optional[float] = None

    @property
    def size(self) -> int:
        return len(self.devices)


def _per_device(chip: Chip, per_chip: float, hbm_override_gib: Optional[float]):
    hbm = hbm_override_gib * GiB if hbm_override_gib is not None else chip.hbm_bytes
    share = lambda v: None if v is None else v / per_chip  # noqa: E731
    return share(hbm), share(chip.peak_flops), share(chip.hbm_bandwidth)


def local_target(hbm_gib: Optional[float] = None) -> Target:
    """The local devices (`jax.devices()`). CPU: the host's RAM divided among its devices, no
    roofline figures; GPU: the device's reported memory limit when it has one."""
    devices = tuple(jax.devices())
    chip = chip_of(devices[0])
    if devices[0].platform == "cpu" and chip.hbm_bytes is None:
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            chip = dataclasses.replace(chip, hbm_bytes=ram / len(devices))
        except (ValueError, OSError, AttributeError):
            pass
    elif devices[0].platform == "gpu":
        try:
            limit = devices[0].memory_stats()["bytes_limit"]
            chip = dataclasses.replace(chip, hbm_bytes=float(limit))
        except Exception:  # noqa: BLE001 - no memory statistics: keep the published figure
            pass
    hbm, flops, bw = _per_device(chip, 1, hbm_gib)
    name = f"{len(devices)} x {devices[0].platform} ({getattr(devices[0], 'device_kind', '')})"
    link = None if len(devices) == 1 or chip.link_bandwidth is None else chip.link_bandwidth
    return Target(name, devices[0].platform, devices, chip, len(devices), hbm, flops, bw, link)


# TPU_ACCELERATOR_TYPE of a slice: its name prefix and devices counted per chip in that name
_ACCELERATOR_TYPES = {"v4": ("v4", 2), "v5e": ("v5litepod", 1), "v5p": ("v5p", 2),
                      "v6e": ("v6e", 1)}


def ensure_tpu_compiler(libtpu_dir: Optional[str] = None, topology: Optional[str] = None) -> None:
    """Makes libtpu (the TPU compiler) importable, or raises PlanError saying how to install it.

    libtpu_dir (or $ARCA_JAX_LIBTPU_DIR): a directory holding the `libtpu` package, e.g. from
    `pip install --target DIR libtpu`, put on sys.path only here, so that plain CPU runs of the
    same environment never see it. libtpu's start-up looks for a TPU host; the variables that
    keep it quiet on a machine without one (TPU_ACCELERATOR_TYPE of `topology`,
    TPU_WORKER_HOSTNAMES=localhost, TPU_SKIP_MDS_QUERY=1; ALLOW_MULTIPLE_LIBTPU_LOAD=1 so that
    several plans can compile at once) are set unless already set, and the
    local JAX backend is kept to the CPU (jax_platforms=cpu) unless JAX_PLATFORMS says otherwise
    or a backend is already running: plan only compiles, it runs nothing."""
    libtpu_dir = libtpu_dir or os.environ.get(LIBTPU_DIR_ENV)
    if libtpu_dir:
        if not os.path.isdir(os.path.join(libtpu_dir, "libtpu")):
            raise PlanError(f"--libtpu {libtpu_dir}: no libtpu package there; {INSTALL_HINT}")
        if libtpu_dir not in sys.path:
            sys.path.insert(0, libtpu_dir)
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise PlanError(f"--topology needs libtpu, the TPU compiler, which is not installed: "
                        f"{INSTALL_HINT}")
    if topology:
        gen, shape = parse_topology(topology)
        prefix, per_chip = _ACCELERATOR_TYPES[gen]
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{math.prod(shape) * per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # compile-only: several plans may load libtpu at once (its lockfile guards real TPUs)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not os.environ.get("JAX_PLATFORMS"):
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")


def parse_topology(topology: str) -> Tuple[str, Tuple[int, ...]]:
    """"v5e:4x4" -> ("v5e", (4, 4)); PlanError for another form or an unknown generation."""
    gen, sep, dims = topology.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not sep or not shape or min(shape) < 1:
        raise PlanError(f"--topology {topology!r}: expected GENERATION:AxB[xC], e.g. v5e:4x4, "
                        "v5p:2x2x2, v6e:2x4")
    if gen not in CHIPS or not gen.startswith("v"):
        raise PlanError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: "
                        f"{', '.join(k for k in CHIPS if k.startswith('v'))}")
    return gen, shape


def tpu_target(topology: str, hbm_gib: Optional[float] = None,
               libtpu_dir: Optional[str] = None) -> Target:
    """Compile-only devices of a TPU slice ("v5e:4x4": 16 v5e chips) from libtpu."""
    gen, shape = parse_topology(topology)
    ensure_tpu_compiler(libtpu_dir, topology)
    from jax.experimental import topologies

    try:
        devices = tuple(topologies.get_topology_desc(topology_name=topology,
                                                     platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's refusal of a topology, in one line
        raise PlanError(f"--topology {topology!r}: libtpu cannot build it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    chips = math.prod(shape)
    per_chip = max(len(devices) // chips, 1)
    chip = CHIPS[gen]
    hbm, flops, bw = _per_device(chip, per_chip, hbm_gib)
    link = None if chip.link_bandwidth is None else chip.link_bandwidth / per_chip
    return Target(f"{gen}:{'x'.join(map(str, shape))} ({chips} chips, {len(devices)} devices)",
                  "tpu", devices, chip, chips, hbm, flops, bw, link)
