"""The figures of compiled programs, per device: memory (`Memory`), loop-scaled work and
roofline time (`ProgramReport`), and a setting's programs together (`Plan`: whether they fit,
seconds per step)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from arca_jax import parallel
from arca_jax.plan import hlostats
from arca_jax.plan.errors import Refusal
from arca_jax.plan.knobs import Knobs, Layout
from arca_jax.plan.programs import Program
from arca_jax.plan.shapes import Shapes
from arca_jax.plan.targets import Target


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device of one program (`compiled.memory_analysis()`), and `resident`: the
    buffers live during it that are not its arguments."""

    argument: int
    output: int
    temp: int
    alias: int
    code: int
    resident: int

    @property
    def total(self) -> int:
        """What the program itself needs: arguments + outputs + temporaries - aliased + code."""
        return self.argument + self.output + self.temp - self.alias + self.code

    @property
    def peak(self) -> int:
        return self.total + self.resident


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One program's figures per device. xla_flops / xla_bytes: XLA's cost analysis (each loop
    body counted once); flops / bytes / collectives: loop-scaled (`hlostats`); loops: their trip
    counts (None: the assumed unknown_trip_count); roofline_s, bound ("compute" or "memory") and
    mfu: None without the chip's figures; interconnect_s: `interconnect_seconds` of its
    collectives (None without a published link bandwidth), not part of the roofline."""

    name: str
    runs_per_step: int
    memory: Memory
    xla_flops: float
    xla_bytes: float
    flops: float
    bytes: float
    loops: Tuple[Optional[int], ...]
    unknown_trip_count: int
    collectives: Dict[str, hlostats.Collective]
    roofline_s: Optional[float]
    bound: Optional[str]
    mfu: Optional[float]
    compile_s: float
    interconnect_s: Optional[float] = None


# `interconnect_seconds`: bytes a device sends and receives per byte of a collective's array
# (ring algorithms over a large group: an all-reduce is a reduce-scatter then an all-gather)
LINK_TRAFFIC = {"all-reduce": 4.0, "all-gather": 2.0, "reduce-scatter": 2.0, "all-to-all": 2.0,
                "ragged-all-to-all": 2.0, "collective-permute": 2.0}


def interconnect_seconds(collectives: Mapping[str, Any],
                         link_bandwidth: Optional[float]) -> Optional[float]:
    """A bandwidth-only estimate of the seconds a program's collectives keep a device's links
    busy: sum over kinds of `LINK_TRAFFIC` x the arrays' bytes (`hlostats.Collective.bytes`, or
    the "bytes" of the JSON's collectives), over the device's inter-chip bandwidth both
    directions together (`Target.link_bandwidth`). Latency (each collective run costs
    microseconds however small it is), the topology (a group whose devices are not neighbours
    shares links) and overlap with compute are left out; groups of n devices move (n - 1) / n of
    the large-group traffic. None without a bandwidth figure."""
    if not link_bandwidth:
        return None
    moved = 0.0
    for kind, c in collectives.items():
        moved += LINK_TRAFFIC.get(kind, 2.0) * float(c["bytes"] if isinstance(c, Mapping)
                                                     else c.bytes)
    return moved / link_bandwidth


def _xla_cost(compiled) -> Tuple[float, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return float("nan"), float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan")))


def report_program(program: Program, target: Target, hlo_dir: Optional[str] = None,
                   tag: str = "") -> ProgramReport:
    """The figures of one compiled program; hlo_dir: also write its compiled HLO text there
    (`<tag><name>.hlo`), e.g. to read its collectives or rerun `hlostats` on it."""
    text = program.compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{tag}{program.name}.hlo"), "w") as f:
            f.write(text)
    m = program.compiled.memory_analysis()
    memory = Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                    int(m.temp_size_in_bytes), int(m.alias_size_in_bytes),
                    int(m.generated_code_size_in_bytes), int(program.resident))
    work = hlostats.analyze(text, program.unknown_trip_count)
    xla_flops, xla_bytes = _xla_cost(program.compiled)
    roofline = bound = mfu = None
    if target.peak_flops and target.hbm_bandwidth:
        t_flops, t_bytes = work.flops / target.peak_flops, work.bytes / target.hbm_bandwidth
        roofline = max(t_flops, t_bytes)
        bound = "compute" if t_flops >= t_bytes else "memory"
        mfu = t_flops / roofline if roofline > 0 else None
    return ProgramReport(program.name, program.runs_per_step, memory, xla_flops, xla_bytes,
                         work.flops, work.bytes, work.loops, program.unknown_trip_count,
                         dict(work.collectives), roofline, bound, mfu, program.compile_s,
                         interconnect_seconds(work.collectives, target.link_bandwidth))


ROLLOUT_PROGRAMS = ("prepare_weights", "prefill", "decode")

# `Plan.decode_gathers_weights`: all-gathered bytes per decode step over its HBM bytes
GATHER_WARNING = 0.1


@dataclasses.dataclass(frozen=True)
class Plan:
    """The programs of one setting on one target.

    rows: completions per step (the global batch); tokens: T per row; problems: what the trainer
    would refuse about the setting (the programs compile anyway). state: the train state's bytes
    per device as the trainer lays it out (`parallel.train_state_bytes`: adapter, Adam moments
    and the step's gradient split over "fsdp"); replicated_state: the same replicated over "fsdp"
    (the layout before ZeRO sharding, for the saving). None: not computed. sampler_gathered:
    the sampler's weights whole over "fsdp" (`rollout.gather_weights`). sampler_layout: the
    rollout mesh's axis sizes where the sampler runs on a layout of its own
    (`rollout.mesh_fsdp` / `rollout.mesh_tensor`); None: on the train mesh."""

    model: str
    target: Target
    knobs: Knobs
    shapes: Shapes
    programs: Tuple[ProgramReport, ...]
    problems: Tuple[str, ...]
    state: Optional[parallel.StateBytes] = None
    replicated_state: Optional[parallel.StateBytes] = None
    refused: Optional[Refusal] = None
    sampler_gathered: bool = False
    sampler_layout: Optional[Layout] = None

    def program(self, name: str) -> Optional[ProgramReport]:
        """The report of the program called `name` (None: not compiled)."""
        return next((r for r in self.programs if r.name == name), None)

    def program_fits(self, report: ProgramReport) -> Optional[bool]:
        """Whether the program's peak fits in the target's memory per device (None: unknown)."""
        hbm = self.target.hbm_bytes
        return None if hbm is None else report.memory.peak <= hbm

    @property
    def fits(self) -> Optional[bool]:
        """Every program compiles and fits and the trainer accepts the setting (None: no memory
        figure)."""
        verdicts = [self.program_fits(p) for p in self.programs]
        if self.refused is not None or any(v is False for v in verdicts) or self.problems:
            return False
        return None if any(v is None for v in verdicts) else True

    @property
    def peak_bytes(self) -> Optional[int]:
        """The largest peak of the programs, bytes per device; with a refusal, at least the
        compiler's figure for the refused program (None: a refusal without a figure)."""
        peaks = [p.memory.peak for p in self.programs]
        if self.refused is not None:
            if self.refused.used_bytes is None:
                return None
            peaks.append(self.refused.used_bytes)
        return max(peaks)

    @property
    def state_share(self) -> Optional[float]:
        """The train state's bytes per device over the peak (None: no state or peak figure)."""
        peak = self.peak_bytes
        return None if self.state is None or not peak else self.state.total / peak

    def seconds(self, names: Sequence[str]) -> Optional[float]:
        """Roofline seconds of the named programs, each times its runs per step (None: a figure
        is missing)."""
        times = [p.roofline_s for p in self.programs if p.name in names]
        if not times or any(t is None for t in times):
            return None
        return sum(p.roofline_s * p.runs_per_step for p in self.programs if p.name in names)

    @property
    def decode_gathered_per_step(self) -> Optional[float]:
        """Bytes the rollout's decode loop all-gathers per device and decode step (None: no
        decode program): the weights' fsdp parts where a step gathers them again, which the
        roofline leaves out (`rollout.gather_weights`, a tensor axis)."""
        r = self.program("decode")
        if r is None:
            return None
        gathered = r.collectives.get("all-gather")
        return (gathered.bytes if gathered else 0.0) / max(self.shapes.new_tokens - 1, 1)

    @property
    def decode_gathers_weights(self) -> bool:
        """The decode loop all-gathers more than a tenth of its HBM bytes per step: each step
        moves a large part of the weights over the interconnect."""
        r = self.program("decode")
        per_step = self.decode_gathered_per_step
        return bool(r is not None and per_step and
                    per_step > GATHER_WARNING * r.bytes / max(self.shapes.new_tokens - 1, 1))

    def interconnect(self, names: Sequence[str]) -> Optional[float]:
        """`interconnect_seconds` of the named programs, each times its runs per step (None: no
        link bandwidth figure)."""
        times = [p.interconnect_s for p in self.programs if p.name in names]
        if not times or any(t is None for t in times):
            return None
        return sum(p.interconnect_s * p.runs_per_step for p in self.programs if p.name in names)

    @property
    def update_s(self) -> Optional[float]:
        """Roofline seconds of one step's updates (train_step x num_iterations)."""
        return self.seconds(("train_step",))

    @property
    def eval_chunk_s(self) -> Optional[float]:
        """Roofline seconds of one evaluation chunk's pass@k sampling (None: not planned)."""
        times = [p.roofline_s for p in self.programs if p.name.startswith("eval_")]
        return None if not times or None in times else sum(times)

    @property
    def rollout_s(self) -> Optional[float]:
        """Roofline seconds of one rollout: weight preparation, prefill, max_new_tokens decodes."""
        return self.seconds(ROLLOUT_PROGRAMS)

    @property
    def update_interconnect_s(self) -> Optional[float]:
        """`interconnect_seconds` of one step's updates (not in `update_s`)."""
        return self.interconnect(("train_step",))

    @property
    def rollout_interconnect_s(self) -> Optional[float]:
        """`interconnect_seconds` of one rollout (not in `rollout_s`)."""
        return self.interconnect(ROLLOUT_PROGRAMS)
