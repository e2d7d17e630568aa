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
              `arca_jax.plan.hlostats` (each loop body times its trip count: decoder layers under
              lax.scan, microbatches under lax.scan, and the decode loop times its worst case of
              max_new_tokens - 1 steps).
  roofline    seconds = max(flops / peak FLOP/s, bytes / HBM bandwidth) of the loop-scaled
              counts, and MFU = flops / (seconds x peak): the share of peak the counted work
              (recomputation included) uses at that time; 1.0 means compute-bound. Collectives'
              interconnect time is not included.
  interconnect  apart from the roofline, a bandwidth-only estimate of the collectives' time
              (`interconnect_seconds`: 4 x an all-reduce's bytes and 2 x any other collective's,
              over the chip's published inter-chip bandwidth, both directions together; v5e
              400 GB/s, v5p 1,200, v6e 800, H100 / H200 NVLink 900; none published for v4).

The verdict: fits when every program's peak fits in HBM; otherwise the smallest change that fits,
trying in order a larger fsdp axis, a tensor axis for the rollouts alone (when a sampler program
is the largest or the refused one), a tensor axis for both, remat, more microbatches (each
recompiled).
A program the compiler refuses for lack of memory (libtpu's RESOURCE_EXHAUSTED, "Used 34.83G of
15.75G hbm") does not fit: the setting is recorded with the compiler's figure as its peak
(`Plan.refused`, "refused" in the JSON) and the search goes on; other compiler errors raise.

Modules, one job each (the public names are re-exported here; the functions call each other
through their own modules, so a test replaces one there, e.g. `search.plan_once`):
    errors    `PlanError`; `RefusedError` and its `Refusal` (the compiler refused a program for
              lack of memory)
    targets   the chips' published figures and the devices to compile for (`Target`,
              `local_target`, `tpu_target`, libtpu)
    knobs     what a plan may change (`Layout`, `Knobs`), the mesh, the trainer's refusals
    shapes    the model config, the run's sizes (`Shapes`) and its abstract inputs
    programs  the train step and sampler programs compiled (`Program`)
    figures   memory, loop-scaled work and roofline per program (`ProgramReport`), and a
              setting's programs together (`Plan`)
    hlostats  loop-aware flops, bytes and collectives read from compiled HLO text
    search    one setting planned (`plan_once`), the changes to try, the verdict (`run`)
    report    the verdict as JSON (`to_json`) and text (`format_text`)
"""

from arca_jax.plan.errors import PlanError, Refusal, RefusedError
from arca_jax.plan.figures import (LINK_TRAFFIC, Memory, Plan, ProgramReport,
                                  interconnect_seconds, report_program)
from arca_jax.plan.knobs import (Knobs, Layout, default_layout, knobs_of, make_mesh,
                                 trainer_problems)
from arca_jax.plan.programs import Program, compile_sampler, compile_train_step
from arca_jax.plan.report import NOTES, format_plan, format_text, plan_json, to_json
from arca_jax.plan.search import Verdict, changes, find_faster, find_fit, plan_once, run
from arca_jax.plan.shapes import (Shapes, abstract_batch, abstract_model, device_bytes,
                                  model_config)
from arca_jax.plan.targets import (CHIPS, GiB, INSTALL_HINT, LIBTPU_DIR_ENV, Chip, Target,
                                   chip_of, ensure_tpu_compiler, local_target, parse_topology,
                                   tpu_target)

__all__ = [
    "CHIPS", "Chip", "GiB", "INSTALL_HINT", "Knobs", "LIBTPU_DIR_ENV", "LINK_TRAFFIC", "Layout",
    "Memory", "NOTES",
    "Plan", "PlanError", "Program", "ProgramReport", "Refusal", "RefusedError", "Shapes", "Target",
    "Verdict",
    "abstract_batch", "abstract_model", "changes", "chip_of", "compile_sampler",
    "compile_train_step", "default_layout", "device_bytes", "ensure_tpu_compiler", "find_faster",
    "find_fit",
    "format_plan", "format_text", "interconnect_seconds", "knobs_of", "local_target", "make_mesh", "model_config",
    "parse_topology", "plan_json", "plan_once", "report_program", "run", "to_json", "tpu_target",
    "trainer_problems",
]
