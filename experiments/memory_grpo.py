"""Peak memory of the compiled GRPO step for Qwen3-1.7B shapes, from XLA's memory analysis.

No weights and no accelerator: the step is lowered on abstract inputs (jax.ShapeDtypeStruct) and
compiled for the CPU backend; ``compiled.memory_analysis()`` reports the bytes of the arguments,
outputs (less those aliased to donated arguments) and temporaries of XLA's buffer assignment.

Setting (issue 5): bfloat16 base, LoRA r = 64 (alpha 128) on all seven projections in float32,
AdamW state, ARCA weighting (gradient forward + shared base forward), microbatch of 8 sequences
of 1024 tokens (512 prompt + 512 completion).

    python experiments/memory_grpo.py                 # all variants, table + JSON
    python experiments/memory_grpo.py --variants remat_chunk128 --breakdown

peak = arguments + outputs - aliased + temporaries (the live set when everything is resident).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
_DUMP = None
if "--breakdown" in sys.argv:  # XLA dumps its buffer assignment; must be set before jax loads
    _DUMP = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arca_jax import lora, qwen3  # noqa: E402
from arca_jax.grpo import Batch, GRPOConfig, TrainState, make_optimizer, make_train_step  # noqa: E402
import results_io  # noqa: E402

GiB = 1024 ** 3

VARIANTS = {
    # name: (remat, logits_chunk)
    "no_remat_chunk128": (False, 128),
    "remat_chunk128": (True, 128),
    "remat_chunk64": (True, 64),
}


def abstract_inputs(config, rank=64, batch=8, seq=1024, prompt=512):
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    params = qwen3.param_shapes(config, jnp.bfloat16)
    tree = jax.eval_shape(lambda: lora.init_lora(config, lcfg, jax.random.PRNGKey(0)))
    opt = make_optimizer(5e-6)
    state = jax.eval_shape(lambda t: TrainState.create(t, opt, jax.random.PRNGKey(0)), tree)
    i32 = jnp.int32
    b = Batch(input_ids=jax.ShapeDtypeStruct((batch, seq), i32),
              attention_mask=jax.ShapeDtypeStruct((batch, seq), i32),
              completion_mask=jax.ShapeDtypeStruct((batch, seq), i32),
              advantages=jax.ShapeDtypeStruct((batch,), jnp.float32),
              positions=jax.ShapeDtypeStruct((batch, seq), i32))
    del prompt  # the layout does not change shapes
    return lcfg, opt, state, params, b


def analyse(name, remat, chunk, weighting="arca", model="Qwen3-1.7B"):
    config = qwen3.preset(model)
    lcfg, opt, state, params, batch = abstract_inputs(config)
    g = GRPOConfig(weighting=weighting, sharpening=2.0, remat=remat, logits_chunk=chunk)
    step = make_train_step(config, g, opt, lora_scale=lcfg.scaling)
    t0 = time.perf_counter()
    compiled = step.lower(state, params, batch).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    peak = arg + out - alias + temp
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    lora_n = lora.count_params(state.lora)
    return dict(variant=name, weighting=weighting, remat=remat, logits_chunk=chunk,
                argument_gib=arg / GiB, output_gib=out / GiB, alias_gib=alias / GiB,
                temp_gib=temp / GiB, peak_gib=peak / GiB, base_params_gib=params_bytes / GiB,
                lora_params=lora_n, compile_s=secs)


_VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")


def breakdown(param_shapes, top=12):
    """Largest values in the step's temporary allocation, from the dumped buffer assignment, and
    the bytes of float32 copies of bfloat16 operands (the CPU backend has no bf16 matmul: XLA
    converts the stacked weights, and the stack of saved layer inputs, to f32 and hoists the
    conversions out of the layer loop; they are large values of the temporary buffer)."""
    pattern = "*jit_step*after_optimizations-buffer-assignment.txt"
    files = sorted(glob.glob(os.path.join(_DUMP, pattern)), key=os.path.getmtime)
    if not files:
        return None
    text = open(files[-1]).read()
    temp = text.split("preallocated-temp:", 1)[1].split("\nallocation ", 1)[0]
    values = [(int(sz), name, shape) for name, sz, _, shape in _VALUE.findall(temp)]
    weight_shapes = {tuple(x.shape) for x in param_shapes}

    def dims(shape):
        return tuple(int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[1]))
    upcasts = {}  # value name -> (bytes, shape): f32 converts of whole weight / activation stacks
    for sz, name, shape in values:
        if shape.startswith("f32[") and "convert" in name and sz >= 64 * 2**20:
            upcasts[name] = (sz, shape, dims(shape) in weight_shapes)
    values.sort(reverse=True)
    largest = [dict(name=n, shape=sh, gib=sz / GiB) for sz, n, sh in values[:top]]
    return dict(top_temporaries=largest,
                f32_weight_copies_gib=sum(v[0] for v in upcasts.values() if v[2]) / GiB,
                f32_upcasts_gib=sum(v[0] for v in upcasts.values()) / GiB,
                f32_upcasts=[dict(name=k, shape=v[1], gib=v[0] / GiB, weight=v[2])
                             for k, v in upcasts.items()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--weighting", default="arca")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--breakdown", action="store_true",
                    help="dump XLA's buffer assignment and list the largest temporaries")
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__} backend {jax.default_backend()} on {cpu}")
    rows = []
    for name in args.variants:
        remat, chunk = VARIANTS[name]
        r = analyse(name, remat, chunk, args.weighting)
        if args.breakdown:
            cfg = qwen3.preset("Qwen3-1.7B")
            shapes = jax.tree_util.tree_leaves(qwen3.param_shapes(cfg, jnp.bfloat16))
            r["breakdown"] = breakdown(shapes)
            shutil.rmtree(_DUMP)
            os.makedirs(_DUMP)
        rows.append(r)
        print(f"{name:20s} peak {r['peak_gib']:6.2f} GiB = args {r['argument_gib']:.2f} + out "
              f"{r['output_gib']:.2f} - aliased {r['alias_gib']:.2f} + temp {r['temp_gib']:.2f} "
              f"(base params {r['base_params_gib']:.2f} GiB, LoRA {r['lora_params'] / 1e6:.1f}M; "
              f"compile {r['compile_s']:.0f} s)", flush=True)
        if r.get("breakdown"):
            bd = r["breakdown"]
            print(f"  f32 upcasts of bf16 operands (CPU backend: no bf16 matmul): "
                  f"{bd['f32_upcasts_gib']:.2f} GiB, of which whole weight stacks "
                  f"{bd['f32_weight_copies_gib']:.2f} GiB; largest temporaries:")
            for t in bd["top_temporaries"]:
                print(f"    {t['gib']:6.3f} GiB  {t['shape']:32s} {t['name']}")
    results_io.write_json(results_io.json_path(args.json, "memory_grpo.json"), rows)


if __name__ == "__main__":
    main()
