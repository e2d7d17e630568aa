"""The run's programs lowered on the mesh and compiled for the target from abstract inputs:
the train step and the sampler's weight preparation, prefill and decode loop (`Program`)."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, List, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from arca_jax import parallel, qwen3, sampling
from arca_jax.config import RunConfig
from arca_jax.plan.errors import Refusal, RefusedError
from arca_jax.plan.knobs import Knobs
from arca_jax.plan.shapes import Shapes, device_bytes


def _outputs(compiled):
    """A compiled program's outputs as ShapeDtypeStructs with their shardings."""
    return jax.tree_util.tree_map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), compiled.out_info)


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


_UNITS = "BKMGTPE"
_USED = re.compile(r"Used\s+([0-9.]+)([KMGTPE]?)i?B?\s+of\s+([0-9.]+)([KMGTPE]?)i?B?\s+hbm")


def _bytes(number: str, unit: str) -> int:
    """XLA's human-readable size ("34.83G": binary units, as `HumanReadableNumBytes` writes
    them) in bytes."""
    return round(float(number) * 1024 ** _UNITS.index(unit or "B"))


def refusal_of(text: str, program: str) -> Optional[Refusal]:
    """The compiler's refusal of `program` for lack of device memory read from its error text
    (None: not a RESOURCE_EXHAUSTED error): the first RESOURCE_EXHAUSTED line, and the figures of
    libtpu's "Used 34.83G of 15.75G hbm" where the text has them."""
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    line = next((x for x in text.splitlines() if "RESOURCE_EXHAUSTED" in x), text).strip()
    used = _USED.search(text)
    if used is None:
        return Refusal(program, line, None, None)
    return Refusal(program, line, _bytes(used.group(1), used.group(2)),
                   _bytes(used.group(3), used.group(4)))


def _compile(lowered, options, name: str):
    """(the compiled program, compile seconds); options: XLA compiler options or None; name:
    the program's, for a refusal. A program the compiler refuses for lack of device memory
    (libtpu checks it against the chip's HBM) raises `RefusedError`: it does not fit. Any other
    compiler error passes through."""
    t = time.time()
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax.errors.JaxRuntimeError and its backends' kin
        refusal = refusal_of(str(e), name)
        if refusal is None:
            raise
        raise RefusedError(refusal) from None
    return compiled, time.time() - t


def compile_train_step(cfg: RunConfig, config, mesh, knobs: Knobs, params, state, optimizer,
                       batch, options=None) -> Program:
    """The trainer's update (`make_train_step(mode="mesh")`) on the abstract inputs."""
    from arca_jax.grpo.step import make_train_step
    from arca_jax.trainer import setup

    platform = mesh.devices.flat[0].platform  # the target's, not this host's default backend
    # "auto" attention is never the CPU kernel here: the mesh step resolves it with its mesh
    grpo = dataclasses.replace(setup.objective_config(cfg), remat=knobs.remat,
                               attention_blocks=qwen3.resolve_attention_blocks(
                                   cfg.grpo.attention_blocks, platform),
                               scan_layers=qwen3.resolve_scan_layers(
                                   cfg.grpo.scan_layers, config.num_hidden_layers, platform))
    step = make_train_step(config, grpo, optimizer, lora_scale=cfg.lora.scaling, mode="mesh",
                           mesh=mesh, microbatches=knobs.microbatches,
                           lora_dropout=cfg.lora.dropout)
    compiled, seconds = _compile(step.jitted.lower(state, params, batch), options,
                                "train_step")
    return Program("train_step", compiled, 0, 1, cfg.grpo.num_iterations, seconds)


def sampler_gathers(cfg: RunConfig, mesh, params, platform: str,
                    device_memory: Optional[float]) -> bool:
    """Whether the sampler's weights are gathered over "fsdp" (`parallel.gather_weights` on the
    abstract `params`' bytes against `device_memory`, a device's bytes; not consulted on CPU,
    as in the trainer, which reads the chip's published memory)."""
    return parallel.gather_weights(cfg.rollout.gather_weights, mesh, parallel.tree_bytes(params),
                                   None if platform == "cpu" else device_memory)


def compile_sampler(cfg: RunConfig, config, mesh, shapes: Shapes, params, state, platform: str,
                    options=None, gather: bool = False) -> List[Program]:
    """The sampler's programs as `sampling.generate` calls them in a rollout: weight
    preparation (low-rank adapter, not merged; with `gather`, whole over "fsdp":
    `sampler_gathers`), prefill and the decode loop, each on the previous one's output layout;
    with `shapes.eval_rows`, also the evaluation's pass@k sampling (its largest chunk), which
    runs every train.eval_every steps, not every step."""
    rep = NamedSharding(mesh, P())
    sd = jax.ShapeDtypeStruct
    attention = qwen3.default_decode_attention(platform, int(mesh.devices.size))
    lora = state.lora
    resident = device_bytes(params) + device_bytes(state)  # live while the sampler runs
    prep, t_prep = _compile(sampling.prepare_weights_jit.lower(
        params, config, lora=lora, lora_scale=sd((), jnp.float32, sharding=rep),
        merge_lora=False, decode_attention=attention, mesh=mesh, gather=gather), options,
        "prepare_weights")
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
    asks `sampling.generate` (when the rows split into whole groups)."""
    r = cfg.rollout
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    settings = sampling.SamplingConfig(max_new_tokens=shapes.sampler_new_tokens,
                                       temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       min_p=r.min_p, eos_ids=(eos,), pad_id=pad)
    rep = NamedSharding(mesh, P())
    sd = jax.ShapeDtypeStruct
    layout = NamedSharding(mesh, parallel.batch_spec(rows, mesh))
    prompts = sd((rows, shapes.sampler_prompt), jnp.int32, sharding=layout)
    pre, t_pre = _compile(sampling.prefill_jit.lower(
        weights, prompts, prompts, config=config, settings=settings,
        rng=sd((2,), jnp.uint32, sharding=rep), limit=sd((), jnp.int32, sharding=rep),
        mesh=mesh, group_size=group_size if rows % group_size == 0 else 1), options,
        prefix + "prefill")
    dec, t_dec = _compile(sampling.decode_jit.lower(
        weights, _outputs(pre), config=config, settings=settings, mesh=mesh), options,
        prefix + "decode")
    steps = max(shapes.new_tokens - 1, 1)  # prefill samples column 0; the loop the rest
    return [Program(prefix + "prefill", pre, resident, 1, runs, t_pre),
            Program(prefix + "decode", dec, resident, steps, runs, t_dec)]
