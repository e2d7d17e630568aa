"""What a plan may change: the mesh layout (data, fsdp, tensor axis sizes), remat,
microbatches and the rollout mesh's tensor size (`Knobs`), the mesh they make, and what the
trainer would refuse about them."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

from arca_jax import parallel
from arca_jax.config import RunConfig
from arca_jax.plan.errors import PlanError


@dataclasses.dataclass(frozen=True)
class Layout:
    """Mesh axis sizes (data, fsdp, tensor); their product is the device count."""

    data: int
    fsdp: int
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def row_shards(self) -> int:
        """Devices holding different rows of a batch (a tensor group shares its rows)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},tensor={self.tensor}"

    @classmethod
    def parse(cls, text: str, devices: int) -> "Layout":
        """"DATA,FSDP,TENSOR" (or "DATA,FSDP"); PlanError unless the product is `devices`."""
        try:
            parts = [int(p) for p in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (2, 3) or min(parts) < 1:
            raise PlanError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR positive integers, "
                            "e.g. 1,8,1")
        layout = cls(*parts)
        if layout.size != devices:
            raise PlanError(f"--mesh {text!r}: {layout.size} devices, the target has {devices}")
        return layout


def default_layout(cfg: RunConfig, devices: int) -> Layout:
    """The config's mesh when it asks for one (train.mode mesh with mesh_fsdp / mesh_tensor set),
    else every device on "fsdp" (no tensor axis): the base weights spread the furthest."""
    t = cfg.train
    tensor = t.mesh_tensor
    if t.mode == "mesh" and (t.mesh_fsdp > 1 or tensor > 1):
        if devices % (t.mesh_fsdp * tensor):
            raise PlanError(f"train.mesh_fsdp={t.mesh_fsdp} x mesh_tensor={tensor} does not "
                            f"divide the {devices} devices")
        return Layout(devices // (t.mesh_fsdp * tensor), t.mesh_fsdp, tensor)
    return Layout(1, devices, 1)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """What a plan compiles with: the mesh, the train step's remat option and microbatches, and
    the rollout mesh's tensor size (`rollout.mesh_tensor`; None: the config's rollout mesh)."""

    layout: Layout
    remat: Any
    microbatches: int
    rollout_tensor: Optional[int] = None

    def overrides(self) -> List[str]:
        """The trainer's `--set` options for these knobs."""
        out = ["train.mode=mesh", f"train.mesh_fsdp={self.layout.fsdp}"]
        if self.layout.tensor > 1:
            out.append(f"train.mesh_tensor={self.layout.tensor}")
        remat = str(self.remat).lower() if isinstance(self.remat, bool) else self.remat
        out += [f"grpo.remat={remat}", f"train.microbatches={self.microbatches}"]
        if self.rollout_tensor is not None:
            out.append(f"rollout.mesh_tensor={self.rollout_tensor}")
        return out

    def config(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with these knobs' rollout mesh (the rest of the knobs are arguments of the
        programs, not config fields the plan reads)."""
        if self.rollout_tensor == cfg.rollout.mesh_tensor:
            return cfg
        return dataclasses.replace(cfg, rollout=dataclasses.replace(
            cfg.rollout, mesh_tensor=self.rollout_tensor))


def knobs_of(cfg: RunConfig, layout: Layout) -> Knobs:
    """The config's own remat, microbatches and rollout mesh on `layout`."""
    return Knobs(layout, cfg.grpo.remat, cfg.train.microbatches, cfg.rollout.mesh_tensor)


def make_mesh(layout: Layout, devices: Sequence[Any]):
    """The ("data", "fsdp", "tensor") mesh of `layout` over `devices` (process-major order);
    PlanError when `parallel.make_mesh` refuses it."""
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    try:
        return parallel.make_mesh(data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor,
                                  devices=devices)
    except ValueError as e:
        raise PlanError(f"mesh {layout}: {e}") from None


def trainer_problems(cfg: RunConfig, knobs: Knobs) -> List[str]:
    """What the trainer would refuse about these knobs (`config.check_environment`'s rules)."""
    rows, m = cfg.batch_size, knobs.microbatches
    if rows % m:
        return [f"the batch of {rows} rows is not divisible by {m} microbatches"]
    if (rows // m) % knobs.layout.row_shards:
        return [f"each microbatch of {rows // m} rows must be divisible by the "
                f"{knobs.layout.row_shards} devices that hold different rows"]
    return []
