"""Compiles only the sampler's weight preparation (`sampling.prepare_weights`) of the paper's
config for a TPU topology, with libtpu on a CPU host, and prints its memory per device: a
minute instead of the full `arca-jax plan`'s half hour when only that program changed.

    ARCA_JAX_LIBTPU_DIR=DIR TPU_WORKER_HOSTNAMES=localhost TPU_ACCELERATOR_TYPE=v5litepod-8 \\
        python experiments/plan_prepare_weights.py v5e:2x4 Qwen/Qwen3-14B-Base 1,4,2
"""

import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from arca_jax import config as run_config, qwen3, sampling
from arca_jax.plan import knobs, shapes, targets

CONFIG = "experiments/configs/paper/arca_r64.yaml"


def main(topology: str, model: str, mesh_axes: str) -> None:
    targets.ensure_tpu_compiler(None, topology)
    target = targets.tpu_target(topology)
    cfg = run_config.load(CONFIG, [f"model.path={model}"])
    data, fsdp, tensor = map(int, mesh_axes.split(","))
    mesh = knobs.make_mesh(knobs.Layout(data=data, fsdp=fsdp, tensor=tensor), target.devices)
    config = shapes.model_config(cfg)
    params, state, _ = shapes.abstract_model(cfg, config, mesh)
    attention = qwen3.default_decode_attention(target.platform, int(mesh.devices.size))
    lowered = sampling.prepare_weights_jit.lower(
        params, config, lora=state.lora,
        lora_scale=jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P())),
        merge_lora=False, decode_attention=attention, mesh=mesh)
    t0 = time.time()
    m = lowered.compile().memory_analysis()
    gib = 2 ** 30
    print(f"prepare_weights {model} {topology} mesh {mesh_axes}: arguments "
          f"{m.argument_size_in_bytes / gib:.2f}, outputs {m.output_size_in_bytes / gib:.2f}, "
          f"temporaries {m.temp_size_in_bytes / gib:.2f} GiB per device; compiled in "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
