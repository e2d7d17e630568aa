"""`arca-jax plan`: compile a run's programs for devices you may not have, and say whether they fit.

    verdict = plan.run(cfg, plan.tpu_target("v5e:4x4"))      # or plan.local_target()
    print(plan.format_text(verdict)); json.dumps(plan.to_json(verdict))

From the run's YAML config it builds, with abstract arrays only (`jax.ShapeDtypeStruct`s carrying
`NamedSharding`s; no weight is loaded or allocated), the programs a training step runs, as the
trainer builds them:

  train_step       `grpo.make_train_step(mode="mesh")` with the config's microbatches and remat,
                   on the rollout batch [B, T]: B = prompts_per_step x group_size rows,
                   T = max_prompt_tokens + max_new_tokens (the longest batch a step can get);
                   runs grpo.num_iterations times per step.
  prepare_weights  the sampler's weight layout (`sampling.prepare_weights_jit`).
  prefill          the prompt forward [B', P] (`sampling.prefill_jit`; B' = B rounded up to a
                   multiple of the device count, P = max_prompt_tokens bucketed as generate does).
  decode           the decode loop (`sampling.decode_jit`), N = max_new_tokens bucketed.

Each is lowered on the mesh and compiled for the target (`jax.jit(...).lower(...).compile()`):
for TPU topologies through libtpu's compiler (`jax.experimental.topologies`, compile-only
devices), else for the local devices. Per program, per device (chip, or TensorCore where a chip
exposes two):

  memory      `compiled.memory_analysis()`: arguments, outputs, temporaries, aliased (donated)
              bytes; total = arguments + outputs + temporaries - aliased + code; peak = total +
              the buffers that stay live while it runs without being its arguments (the base
              weights and the train state during sampling), against the chip's HBM.
  work        XLA's `compiled.cost_analysis()` flops and bytes (which count every while-loop or
              scan body ONCE), and the loop-scaled flops, HBM bytes and collectives of
              `arca_jax.hlostats` (each loop body times its trip count: decoder layers under
              nn.scan, microbatches under lax.scan, and the decode loop times its worst case of
              max_new_tokens - 1 steps).
  roofline    seconds = max(flops / peak FLOP/s, bytes / HBM bandwidth) of the loop-scaled
              counts, and MFU = flops / (seconds x peak): the share of peak the counted work
              (recomputation included) uses at that time; 1.0 means compute-bound. Collectives'
              interconnect time is not included.

The verdict: fits when every program's peak fits in HBM; otherwise the smallest change that fits,
trying in order a larger fsdp axis, a tensor axis, remat, more microbatches (each recompiled).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from arca_jax import hlostats, parallel, qwen3, sampling
from arca_jax.config import RunConfig
from arca_jax.errors import ConfigError

GiB = 1024 ** 3
INSTALL_HINT = ("pip install 'arca-jax[tpu]' (or: pip install libtpu; or pip install --target DIR "
                "libtpu and pass --libtpu DIR)")
LIBTPU_DIR_ENV = "ARCA_JAX_LIBTPU_DIR"


class PlanError(ConfigError):
    """Input plan cannot work with (unknown topology, no libtpu, a mesh that does not divide)."""


# --------------------------------------------------------------------------------------------
# Chips
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one chip. hbm_bytes: memory per chip (bytes); peak_flops: dense bf16
    FLOP/s per chip; hbm_bandwidth: bytes/s per chip. None: no published figure."""

    name: str
    hbm_bytes: Optional[float]
    peak_flops: Optional[float]
    hbm_bandwidth: Optional[float]
    source: str = ""


CHIPS: Dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "Cloud TPU v4 docs (2 TensorCores per chip)"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "Cloud TPU v5e docs"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "Cloud TPU v5p docs"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, "Cloud TPU v6e (Trillium) docs"),
    "h100": Chip("NVIDIA H100 SXM", 80e9, 989e12, 3.35e12, "NVIDIA H100 datasheet (dense bf16)"),
    "h200": Chip("NVIDIA H200 SXM", 141e9, 989e12, 4.8e12, "NVIDIA H200 datasheet (dense bf16)"),
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
    (bytes/s) per device, or None."""

    name: str
    platform: str
    devices: Tuple[Any, ...]
    chip: Chip
    chips: int
    hbm_bytes: Optional[float]
    peak_flops: Optional[float]
    hbm_bandwidth: Optional[float]

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
    return Target(name, devices[0].platform, devices, chip, len(devices), hbm, flops, bw)


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
    return Target(f"{gen}:{'x'.join(map(str, shape))} ({chips} chips, {len(devices)} devices)",
                  "tpu", devices, chip, chips, hbm, flops, bw)


# --------------------------------------------------------------------------------------------
# Knobs: what the plan may change
# --------------------------------------------------------------------------------------------


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
    tensor = getattr(t, "mesh_tensor", 1)
    if t.mode == "mesh" and (t.mesh_fsdp > 1 or tensor > 1):
        if devices % (t.mesh_fsdp * tensor):
            raise PlanError(f"train.mesh_fsdp={t.mesh_fsdp} x mesh_tensor={tensor} does not "
                            f"divide the {devices} devices")
        return Layout(devices // (t.mesh_fsdp * tensor), t.mesh_fsdp, tensor)
    return Layout(1, devices, 1)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """What a plan compiles with: the mesh, the train step's remat option and microbatches."""

    layout: Layout
    remat: Any
    microbatches: int

    def overrides(self) -> List[str]:
        """The trainer's `--set` options for these knobs."""
        out = ["train.mode=mesh", f"train.mesh_fsdp={self.layout.fsdp}"]
        if self.layout.tensor > 1:
            out.append(f"train.mesh_tensor={self.layout.tensor}")
        remat = str(self.remat).lower() if isinstance(self.remat, bool) else self.remat
        return out + [f"grpo.remat={remat}", f"train.microbatches={self.microbatches}"]


def knobs_of(cfg: RunConfig, layout: Layout) -> Knobs:
    return Knobs(layout, cfg.grpo.remat, cfg.train.microbatches)


def tensor_supported() -> bool:
    """Whether `parallel.make_mesh` takes a tensor axis (tensor parallelism is in the code)."""
    return "tensor" in inspect.signature(parallel.make_mesh).parameters


def make_mesh(layout: Layout, devices: Sequence[Any]):
    if layout.tensor > 1 and not tensor_supported():
        raise PlanError(f"mesh tensor={layout.tensor}: this version has no tensor parallelism "
                        "(parallel.make_mesh takes data and fsdp only)")
    kw = {"tensor": layout.tensor} if tensor_supported() else {}
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    try:
        return parallel.make_mesh(data=layout.data, fsdp=layout.fsdp, devices=devices, **kw)
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


# --------------------------------------------------------------------------------------------
# Abstract inputs
# --------------------------------------------------------------------------------------------


def model_config(cfg: RunConfig) -> qwen3.Qwen3Config:
    """The model's shapes: a local directory's config.json, else the preset of that name
    ("Qwen/Qwen3-8B-Base" -> `qwen3.preset`). Nothing is downloaded or loaded."""
    path = cfg.model.resolved_path()
    if os.path.isfile(os.path.join(path, "config.json")):
        return qwen3.Qwen3Config.from_hf(path)
    try:
        return qwen3.preset(cfg.model.path)
    except KeyError:
        raise PlanError(f"model.path {cfg.model.path!r}: no local config.json and no preset of "
                        f"that name (known: {', '.join(sorted(qwen3.config._PRESETS))}); plan "
                        "loads no weights, so a released model's name is enough") from None


def _sds(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _outputs(compiled):
    """A compiled program's outputs as ShapeDtypeStructs with their shardings."""
    return jax.tree_util.tree_map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), compiled.out_info)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The run's sizes. rows B (completions per step), T = P + N tokens per training row;
    sampler rows B' (B rounded up to the devices holding different rows), prompt width P' and
    generation width N' (bucketed to powers of two, at least 16, as `sampling.generate`);
    eval_rows: the rows of the evaluation's largest pass@k chunk (min(eval_batch_size,
    num_eval_problems) x pass_k, rounded up likewise), 0 when the evaluation is not planned."""

    rows: int
    prompt: int
    new_tokens: int
    sampler_rows: int
    sampler_prompt: int
    sampler_new_tokens: int
    eval_rows: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.new_tokens

    @classmethod
    def of(cls, cfg: RunConfig, devices: int, evaluation: bool = False) -> "Shapes":
        """devices: those holding different rows (data x fsdp)."""
        r, t = cfg.rollout, cfg.train
        rows = cfg.batch_size
        eval_rows = (min(t.eval_batch_size, cfg.task.num_eval_problems)
                     * (t.pass_k or r.group_size)) if evaluation else 0
        up = lambda n: -(-n // devices) * devices  # noqa: E731
        return cls(rows, r.max_prompt_tokens, r.max_new_tokens, up(rows),
                   sampling.bucket_size(r.max_prompt_tokens, 16),
                   sampling.bucket_size(r.max_new_tokens, 16), up(eval_rows) if eval_rows else 0)


def _state_shardings(state, mesh, config):
    fn = getattr(parallel, "state_shardings", None)
    if fn is None:
        return parallel.replicated(state, mesh)
    return fn(state, mesh, config.num_key_value_heads)


def abstract_model(cfg: RunConfig, config: qwen3.Qwen3Config, mesh):
    """(params, train state, optimizer): base parameters (model.dtype) and the step-0 train
    state as ShapeDtypeStructs laid out as the trainer places them."""
    from arca_jax.trainer import setup

    params = qwen3.param_shapes(config, jnp.dtype(cfg.model.dtype))
    params = _sds(params, parallel.param_shardings(params, mesh))
    optimizer = setup.build_optimizer(cfg)
    state = jax.eval_shape(lambda: setup.init_state(cfg, config, optimizer))
    state = _sds(state, _state_shardings(state, mesh, config))
    return params, state, optimizer


def abstract_batch(cfg: RunConfig, shapes: Shapes, mesh):
    """The rollout's training `Batch` [B, T] as `sampling.build_batch` makes it (old_logps too
    when grpo.num_iterations > 1), sharded as the train step takes it."""
    B, Pw, N = shapes.rows, shapes.prompt, shapes.new_tokens
    i32, f32 = jnp.int32, jnp.float32
    sd = jax.ShapeDtypeStruct
    out = sampling.SampleOutput(tokens=sd((B, N), i32), mask=sd((B, N), i32),
                                logps=sd((B, N), f32), lengths=sd((B,), i32),
                                finished=sd((B,), jnp.bool_), num_steps=sd((), i32),
                                sampled_logps=sd((B, N), f32))
    batch = jax.eval_shape(lambda ids, o, a: sampling.build_batch(ids, ids, o, a),
                           sd((B, Pw), i32), out, sd((B,), f32))
    if cfg.grpo.num_iterations > 1:
        batch = batch.replace(old_logps=batch.sample_logps)
    return _sds(batch, parallel.batch_shardings(batch, mesh))


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program: its name, the compiled executable, the bytes per device that stay
    live while it runs without being its arguments, the trip count to assume for loops whose
    bound is not a constant, how many times a training step runs it, and compile seconds."""

    name: str
    compiled: Any
    resident: int
    unknown_trip_count: int
    runs_per_step: int
    compile_s: float


def _compile(lowered, options):
    t = time.time()
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    return compiled, time.time() - t


def compile_train_step(cfg: RunConfig, config, mesh, knobs: Knobs, params, state, optimizer,
                       batch, options=None) -> Program:
    """The trainer's update (`make_train_step(mode="mesh")`) on the abstract inputs."""
    from arca_jax.grpo.step import make_train_step
    from arca_jax.trainer import setup

    grpo = dataclasses.replace(setup.objective_config(cfg), remat=knobs.remat)
    step = make_train_step(config, grpo, optimizer, lora_scale=cfg.lora.scaling, mode="mesh",
                           mesh=mesh, microbatches=knobs.microbatches,
                           lora_dropout=cfg.lora.dropout)
    compiled, seconds = _compile(step.jitted.lower(state, params, batch), options)
    return Program("train_step", compiled, 0, 1, cfg.grpo.num_iterations, seconds)


def _with_mesh(fn, mesh) -> dict:
    """{"mesh": mesh} when the sampler's function takes the mesh (tensor-parallel versions)."""
    return {"mesh": mesh} if "mesh" in inspect.signature(fn).parameters else {}


def compile_sampler(cfg: RunConfig, config, mesh, shapes: Shapes, params, state, platform: str,
                    options=None) -> List[Program]:
    """The sampler's programs as `sampling.generate` calls them in a rollout: weight
    preparation (low-rank adapter, not merged), prefill and the decode loop, each on the
    previous one's output layout; with `shapes.eval_rows`, also the evaluation's pass@k
    sampling (its largest chunk), which runs every train.eval_every steps, not every step."""
    rep = NamedSharding(mesh, P())
    sd = jax.ShapeDtypeStruct
    attention = "reduce" if platform == "cpu" else "dot"  # qwen3.default_decode_attention
    lora = state.lora
    resident = device_bytes(params) + device_bytes(state)  # live while the sampler runs
    prep_kw = dict(lora=lora, lora_scale=sd((), jnp.float32, sharding=rep), merge_lora=False,
                   decode_attention=attention, **_with_mesh(sampling.prepare_weights_jit, mesh))
    if "decode_attention" not in inspect.signature(sampling.prepare_weights_jit).parameters:
        prep_kw.pop("decode_attention")
    prep, t_prep = _compile(sampling.prepare_weights_jit.lower(params, config, **prep_kw), options)
    weights = _outputs(prep)
    programs = [Program("prepare_weights", prep, device_bytes(state) - device_bytes(lora), 1, 1,
                        t_prep)]
    programs += _generate(cfg, config, mesh, weights, shapes.sampler_rows, shapes, resident, "",
                          1, cfg.rollout.group_size, options)
    if shapes.eval_rows:
        k = cfg.train.pass_k or cfg.rollout.group_size
        programs += _generate(cfg, config, mesh, weights, shapes.eval_rows, shapes, resident,
                              "eval_", 0, k, options)
    return programs


def _generate(cfg: RunConfig, config, mesh, weights, rows: int, shapes: Shapes, resident: int,
              prefix: str, runs: int, group_size: int, options) -> List[Program]:
    """Prefill [rows, P'] and the decode loop of N' columns on prepared `weights`; rows come in
    groups of `group_size` copies of a prompt, each prefilled once, as `trainer.generate_rows`
    asks `sampling.generate` (when the rows split into whole groups and the sampler can)."""
    r = cfg.rollout
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    settings = sampling.SamplingConfig(max_new_tokens=shapes.sampler_new_tokens,
                                       temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       eos_ids=(eos,), pad_id=pad)
    rep = NamedSharding(mesh, P())
    sd = jax.ShapeDtypeStruct
    layout = NamedSharding(mesh, parallel.batch_spec(rows, mesh))
    prompts = sd((rows, shapes.sampler_prompt), jnp.int32, sharding=layout)
    extra = _with_mesh(sampling.prefill, mesh)
    if "group_size" in inspect.signature(sampling.prefill).parameters:
        extra["group_size"] = group_size if rows % group_size == 0 else 1
    pre, t_pre = _compile(sampling.prefill_jit.lower(
        weights, prompts, prompts, config=config, settings=settings,
        rng=sd((2,), jnp.uint32, sharding=rep), limit=sd((), jnp.int32, sharding=rep),
        **extra), options)
    dec, t_dec = _compile(sampling.decode_jit.lower(
        weights, _outputs(pre), config=config, settings=settings,
        **_with_mesh(sampling.decode, mesh)), options)
    steps = max(shapes.new_tokens - 1, 1)  # prefill samples column 0; the loop the rest
    return [Program(prefix + "prefill", pre, resident, 1, runs, t_pre),
            Program(prefix + "decode", dec, resident, steps, runs, t_dec)]


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


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
    mfu: None without the chip's figures."""

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
                         dict(work.collectives), roofline, bound, mfu, program.compile_s)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The programs of one setting on one target.

    rows: completions per step (the global batch); tokens: T per row; problems: what the trainer
    would refuse about the setting (the programs compile anyway)."""

    model: str
    target: Target
    knobs: Knobs
    shapes: Shapes
    programs: Tuple[ProgramReport, ...]
    problems: Tuple[str, ...]

    def program_fits(self, report: ProgramReport) -> Optional[bool]:
        """Whether the program's peak fits in the target's memory per device (None: unknown)."""
        hbm = self.target.hbm_bytes
        return None if hbm is None else report.memory.peak <= hbm

    @property
    def fits(self) -> Optional[bool]:
        """Every program fits and the trainer accepts the setting (None: no memory figure)."""
        verdicts = [self.program_fits(p) for p in self.programs]
        if any(v is False for v in verdicts) or self.problems:
            return False
        return None if any(v is None for v in verdicts) else True

    @property
    def peak_bytes(self) -> int:
        return max(p.memory.peak for p in self.programs)

    def seconds(self, names: Sequence[str]) -> Optional[float]:
        times = [p.roofline_s for p in self.programs if p.name in names]
        if not times or any(t is None for t in times):
            return None
        return sum(p.roofline_s * p.runs_per_step for p in self.programs if p.name in names)

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
        return self.seconds(("prepare_weights", "prefill", "decode"))


def plan_once(cfg: RunConfig, target: Target, knobs: Knobs, options=None,
              reuse: Optional[Plan] = None, log=lambda text: None,
              evaluation: bool = False, hlo_dir: Optional[str] = None) -> Plan:
    """Compiles every program of `knobs` on `target` and reports them. `reuse`: a plan of the
    same layout whose sampler programs are still valid (only remat or microbatches changed).
    evaluation: also the evaluation's pass@k sampling (`Shapes.eval_rows`)."""
    config = model_config(cfg)
    mesh = make_mesh(knobs.layout, target.devices)
    shapes = Shapes.of(cfg, knobs.layout.row_shards, evaluation)
    params, state, optimizer = abstract_model(cfg, config, mesh)
    batch = abstract_batch(cfg, shapes, mesh)
    train = compile_train_step(cfg, config, mesh, knobs, params, state, optimizer, batch, options)
    log(f"compiled train_step in {train.compile_s:.0f} s")
    tag = (f"{knobs.layout.data}-{knobs.layout.fsdp}-{knobs.layout.tensor}"
           f"_remat-{knobs.remat}_mb-{knobs.microbatches}_")
    reports = [report_program(train, target, hlo_dir, tag)]
    if reuse is not None and reuse.knobs.layout == knobs.layout:
        reports += [p for p in reuse.programs if p.name != "train_step"]
    else:
        sampler = compile_sampler(cfg, config, mesh, shapes, params, state, target.platform,
                                  options)
        log("compiled " + ", ".join(f"{p.name} in {p.compile_s:.0f} s" for p in sampler))
        reports += [report_program(p, target, hlo_dir, tag) for p in sampler]
    return Plan(cfg.model.path, target, knobs, shapes, tuple(reports),
                tuple(trainer_problems(cfg, knobs)))


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The plan of the asked setting; when it does not fit, the first change that does (or None)
    and every setting tried, in order, with its peak memory per device."""

    plan: Plan
    suggestion: Optional[Plan]
    tried: Tuple[Knobs, ...]
    peaks: Tuple[int, ...] = ()  # the peak bytes per device of each setting tried


def _valid_tensors(config, devices: int) -> List[int]:
    if not tensor_supported():
        return []
    out = []
    for t in (2, 4, 8, 16):
        if devices % t or config.num_attention_heads % t or config.intermediate_size % t:
            continue
        check = getattr(parallel, "check_tensor", None)
        try:
            if check is not None:
                check(config, t)
        except (ValueError, ConfigError):
            continue
        out.append(t)
    return out


def changes(cfg: RunConfig, devices: int) -> List[Tuple[str, Any]]:
    """The changes to try, in order, as (name, knobs -> changed knobs or None when it does not
    apply): every device on fsdp; each tensor axis size (2, 4, ...) the model and the code
    allow; remat; microbatches doubled (up to four times, while the trainer accepts them)."""
    config = model_config(cfg)

    def fsdp(k: Knobs) -> Optional[Knobs]:
        widest = Layout(1, devices // k.layout.tensor, k.layout.tensor)
        return dataclasses.replace(k, layout=widest) if widest.fsdp > k.layout.fsdp else None

    def tensor(t: int):
        def change(k: Knobs) -> Optional[Knobs]:
            return (dataclasses.replace(k, layout=Layout(1, devices // t, t))
                    if t > k.layout.tensor else None)
        return change

    def remat(k: Knobs) -> Optional[Knobs]:
        return None if k.remat else dataclasses.replace(k, remat=True)

    def microbatches(k: Knobs) -> Optional[Knobs]:
        more = dataclasses.replace(k, microbatches=k.microbatches * 2)
        return None if trainer_problems(cfg, more) else more

    return ([("fsdp", fsdp)] + [(f"tensor={t}", tensor(t)) for t in _valid_tensors(config, devices)]
            + [("remat", remat)] + [("microbatches", microbatches)] * 4)


def run(cfg: RunConfig, target: Target, layout: Optional[Layout] = None, options=None,
        search: bool = True, max_tries: int = 6, log=lambda text: None,
        evaluation: bool = False, hlo_dir: Optional[str] = None) -> Verdict:
    """Plans `cfg` on `target` (layout: `default_layout` when None); when it does not fit and
    `search`, looks for the smallest change that does (`find_fit`). options: XLA compiler
    options for every compile (e.g. {"xla_backend_optimization_level": 0} in CPU tests).
    evaluation: also plan the evaluation's pass@k sampling. hlo_dir: write every compiled
    program's HLO text there."""
    model_config(cfg)  # a model plan cannot build fails before anything compiles
    layout = layout or default_layout(cfg, target.size)
    log(f"compiling for {target.name}, mesh {layout}")
    first = plan_once(cfg, target, knobs_of(cfg, layout), options, log=log,
                      evaluation=evaluation, hlo_dir=hlo_dir)
    if first.fits is not False or not search:
        return Verdict(first, None, (first.knobs,), (first.peak_bytes,))
    return find_fit(cfg, first, options, max_tries, log, hlo_dir)


def find_fit(cfg: RunConfig, first: Plan, options=None, max_tries: int = 6,
             log=lambda text: None, hlo_dir: Optional[str] = None) -> Verdict:
    """Tries the `changes` of a plan that does not fit, in order, each recompiled on the same
    target (at most `max_tries` compiles), until one fits. A change that lowers the peak memory
    is kept for the next ones; one that does not is dropped, so the answer is the smallest
    combination found along the way."""
    best, tried, by_layout = first, [first.knobs], {first.knobs.layout: first}
    peaks = [first.peak_bytes]
    for what, change in changes(cfg, first.target.size):
        k = change(best.knobs)
        if k is None or k in tried:
            continue
        if len(tried) > max_tries:
            break
        log(f"does not fit; trying {what}: mesh {k.layout}, remat {k.remat}, "
            f"microbatches {k.microbatches}")
        p = plan_once(cfg, first.target, k, options, reuse=by_layout.get(k.layout), log=log,
                      evaluation=first.shapes.eval_rows > 0, hlo_dir=hlo_dir)
        tried.append(k)
        peaks.append(p.peak_bytes)
        by_layout.setdefault(k.layout, p)
        if p.fits:
            return Verdict(first, p, tuple(tried), tuple(peaks))
        if p.peak_bytes < best.peak_bytes and not p.problems:
            best = p
    return Verdict(first, None, tuple(tried), tuple(peaks))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GiB, 3)


def plan_json(p: Plan) -> dict:
    t = p.target
    return {
        "model": p.model,
        "target": {"name": t.name, "platform": t.platform, "chip": t.chip.name, "chips": t.chips,
                   "devices": t.size, "hbm_bytes_per_device": t.hbm_bytes,
                   "peak_flops_per_device": t.peak_flops,
                   "hbm_bandwidth_per_device": t.hbm_bandwidth, "chip_source": t.chip.source},
        "mesh": dataclasses.asdict(p.knobs.layout),
        "remat": p.knobs.remat,
        "microbatches": p.knobs.microbatches,
        "trainer_overrides": p.knobs.overrides(),
        "global_batch": {"rows": p.shapes.rows, "tokens_per_row": p.shapes.tokens,
                         "tokens": p.shapes.rows * p.shapes.tokens},
        "sampler": {"rows": p.shapes.sampler_rows, "prompt_width": p.shapes.sampler_prompt,
                    "new_tokens_width": p.shapes.sampler_new_tokens,
                    "decode_steps": p.shapes.new_tokens - 1,
                    "eval_rows": p.shapes.eval_rows},
        "fits": p.fits,
        "problems": list(p.problems),
        "peak_bytes_per_device": p.peak_bytes,
        "peak_gib_per_device": _gib(p.peak_bytes),
        "update_s": p.update_s,
        "rollout_s": p.rollout_s,
        "step_s": None if p.update_s is None or p.rollout_s is None else p.update_s + p.rollout_s,
        "eval_chunk_s": p.eval_chunk_s,
        "programs": [dict(_program_json(r), fits=p.program_fits(r)) for r in p.programs],
    }


def _program_json(r: ProgramReport) -> dict:
    m = r.memory
    return {
        "name": r.name, "runs_per_step": r.runs_per_step,
        "memory_bytes": {"argument": m.argument, "output": m.output, "temp": m.temp,
                         "alias": m.alias, "code": m.code, "total": m.total,
                         "resident": m.resident, "peak": m.peak},
        "xla_cost_analysis": {"flops": r.xla_flops, "bytes_accessed": r.xla_bytes,
                              "note": "each while-loop / scan body counted once"},
        "flops": r.flops, "bytes": r.bytes,
        "loops": list(r.loops), "unknown_trip_count": r.unknown_trip_count,
        "collectives": {k: dataclasses.asdict(v) for k, v in r.collectives.items()},
        "roofline_s": r.roofline_s, "bound": r.bound, "mfu": r.mfu,
        "compile_s": round(r.compile_s, 2),
    }


def to_json(v: Verdict) -> dict:
    return {
        "plan": plan_json(v.plan),
        "suggestion": None if v.suggestion is None else plan_json(v.suggestion),
        "tried": [{"mesh": dataclasses.asdict(k.layout), "remat": k.remat,
                   "microbatches": k.microbatches, "peak_gib_per_device": _gib(peak)}
                  for k, peak in itertools.zip_longest(v.tried, v.peaks)],
        "notes": NOTES,
    }


NOTES = ("Per device. XLA's cost analysis counts each while-loop or scan body once; flops, bytes "
         "and collectives here multiply every loop body by its trip count (decoder layers, "
         "microbatches, and the decode loop's max_new_tokens - 1 steps, its worst case). Roofline "
         "seconds = max(flops / peak, bytes / HBM bandwidth); interconnect time is not included.")


def _fmt_bytes(n: Optional[float]) -> str:
    """GiB with three significant digits."""
    return "-" if n is None else f"{n / GiB:.3g}"


def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _yes_no(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_plan(p: Plan) -> str:
    t = p.target
    lines = [f"{p.model} on {t.name}, {t.chip.name}: mesh {p.knobs.layout}, remat "
             f"{p.knobs.remat}, microbatches {p.knobs.microbatches}",
             f"  batch {p.shapes.rows} rows x {p.shapes.tokens} tokens; sampler "
             f"{p.shapes.sampler_rows} rows, prompt {p.shapes.sampler_prompt}, "
             f"{p.shapes.sampler_new_tokens} new tokens",
             f"  HBM per device: {_fmt_bytes(t.hbm_bytes)} GiB"
             + ("" if t.peak_flops else f" ({t.chip.source})"),
             "  program          args  out  temp alias  total  peak GiB  fits   TFLOP   GB"
             "     roofline  bound    MFU  collectives (runs)"]
    for r in p.programs:
        m = r.memory
        coll = ", ".join(f"{k} {c.runs:g}" for k, c in r.collectives.items() if c.runs)
        lines.append(
            f"  {r.name:<15} {_fmt_bytes(m.argument):>5} {_fmt_bytes(m.output):>4} "
            f"{_fmt_bytes(m.temp):>5} {_fmt_bytes(m.alias):>5} {_fmt_bytes(m.total):>6} "
            f"{_fmt_bytes(m.peak):>9}  {_yes_no(p.program_fits(r)):>4}"
            f" {r.flops / 1e12:7.3f} {r.bytes / 1e9:6.2f} {_fmt_s(r.roofline_s):>10}  "
            f"{r.bound or '-':<7} {'-' if r.mfu is None else f'{r.mfu:.2f}':>4}  {coll or '-'}")
    lines.append(f"  per step: update {_fmt_s(p.update_s)}, rollout {_fmt_s(p.rollout_s)} "
                 "(roofline)" + (f"; an evaluation chunk of {p.shapes.eval_rows} rows "
                                 f"{_fmt_s(p.eval_chunk_s)}" if p.shapes.eval_rows else ""))
    for problem in p.problems:
        lines.append(f"  the trainer refuses this: {problem}")
    return "\n".join(lines)


def format_text(v: Verdict) -> str:
    out = [format_plan(v.plan)]
    fits = v.plan.fits
    if fits:
        out.append("verdict: fits")
    elif fits is None:
        out.append("verdict: unknown (no memory figure for this device; pass --hbm GIB)")
    elif v.suggestion is not None:
        out.append("verdict: does not fit; the smallest change that fits:")
        out.append(format_plan(v.suggestion))
        out.append("  train with: "
                   + " ".join(f"--set {o}" for o in v.suggestion.knobs.overrides()))
    else:
        out.append(f"verdict: does not fit, and none of the {len(v.tried) - 1} changes tried fits:")
        for k, peak in itertools.zip_longest(v.tried, v.peaks):
            out.append(f"  mesh {k.layout}, remat {k.remat}, microbatches {k.microbatches}: "
                       f"peak {_fmt_bytes(peak)} GiB")
    out.append("note: " + NOTES)
    return "\n".join(out)
