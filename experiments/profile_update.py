"""Where the update step's time goes on CPU, for the embedded demo's training batch (issue 19).

The batch is the shape `arca-jax train` builds in `experiments/bench_vs_trl.py`'s setting: the
tiny arithmetic model (arca_jax/assets/tiny-arith), LoRA r=8 alpha 16 on the seven projections
(B random, so the adapter acts), 16 prompts x 8 completions = 128 rows, prompts left-padded to
their bucket, completions right-padded to the generation budget (80) with lengths drawn around
the demo's mean (41 tokens), float32. Each variant is one jitted program timed on the same
batch, warmed up, rounds interleaved; medians reported, with the PyTorch + PEFT forward +
backward + AdamW of the same batch (what TRL's update runs) in the same process.

    python experiments/profile_update.py [--rounds 7] [--variants a,b,...] [--no-torch]

Compare XLA variants with --no-torch: PyTorch's OpenMP threads spin on for a while after each
of its calls and slow the XLA call that follows in the round.

Not a test: times only. Variants (name: what differs from "uniform"):
  uniform        the trainer's train step, grpo.weighting=uniform (the default program)
  arca           grpo.weighting=arca (adds the no-grad base forward)
  fwd            uniform's loss only (no gradient, no optimiser)
  width_trim     uniform on a batch cut to the longest completion (what TRL pads to)
  packed, packed_arca   uniform / arca on the batch packed into lines (`arca_jax.packing`),
                 the line count rounded up to a multiple of 16
  packed_arca_rule  arca packed as the trainer packs (`trainer.programs`: quarters of B)
  shared_rule, shared_arca_rule   uniform / arca packed so, each group's prompt shared by the
                 completions in its line (`train.share_prompts`)
  packed_arca_all   arca packed into B lines (quarters' worst case: as many lines as rows)
  packed_arca_at_L  arca packed into L lines (at least the batch's need)
  shared_arca_wW    arca, prompts shared, lines of W slots, line count in quarters of B
  shared_arca_bN    shared_arca_rule with N attention query blocks (`GRPOConfig.attention_blocks`;
                 the rule's default on CPU: 4)
  packed_arca_w15, packed_arca_w2   arca in lines of 1.5 T / 2 T slots, sixteenths of B
  chunk_all      logits_chunk = T (one chunk)
  xnn / onednn / fastmath   XLA CPU compiler options
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax import hf, host_memory, lora, packing  # noqa: E402
from arca_jax.config import ModelConfig  # noqa: E402
from arca_jax.grpo import (Batch, GRPOConfig, TrainState, make_optimizer,  # noqa: E402
                           make_train_step)
from arca_jax.grpo.objective import loss_fn  # noqa: E402
from arca_jax.trainer.programs import StepPrograms  # noqa: E402
from bench_grpo import random_lora  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def demo_adapter(config, key, b_scale=0.05, lora_config=None):
    """A LoRA tree (rank 8, alpha 16, the seven projections unless `lora_config`) whose B
    matrices are random normal x `b_scale` instead of zeros, so that the adapter changes the
    model (ARCA's residuals are non-zero) as after some training steps."""
    lcfg = lora_config or lora.LoraConfig(rank=8, alpha=16, targets=TARGETS)
    return lcfg, random_lora(config, lcfg, key, b_scale)


def demo_batch(B=128, prompt=32, new=80, mean_len=41, seed=0, prompt_tokens=(12, 20), G=8):
    """GRPO groups: rows g G .. g G + G - 1 share one prompt (as the trainer's batches)."""
    rng = np.random.default_rng(seed)
    T = prompt + new
    ids = rng.integers(3, 99, (B, T)).astype(np.int32)
    am = np.zeros((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    lens = np.clip(rng.normal(mean_len, 12, B).round().astype(int), 8, new)
    for b in range(B):
        if b % G == 0:
            p = int(rng.integers(*prompt_tokens))
        else:
            ids[b, :prompt] = ids[b - 1, :prompt]
        am[b, prompt - p:prompt + lens[b]] = 1
        cm[b, prompt:prompt + lens[b]] = 1
    ids = np.where(am == 1, ids, 0)
    adv = rng.normal(size=B).astype(np.float32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                 completion_mask=jnp.asarray(cm), advantages=jnp.asarray(adv),
                 prompt_width=prompt), int(prompt + lens.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--bench-lengths", action="store_true",
                    help="prompts of 14-25 tokens and completions of mean 43, as in "
                         "bench_vs_trl's rollouts (default: 12-19 and 41)")
    ap.add_argument("--trace", default=None,
                    help="capture a profiler trace of 3 calls of this variant and print the "
                         "XLA operations taking the most time")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (the trainer's commands set it to reuse "
                         "freed memory on CPU: arca_jax.host_memory)")
    args = ap.parse_args()
    if not args.malloc_default:
        host_memory.reuse_freed_memory()  # as `arca-jax train` does, before JAX starts

    path = ModelConfig().resolved_path()
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    lcfg, tree = demo_adapter(config, key)
    batch, trim = (demo_batch(mean_len=43, prompt_tokens=(14, 26)) if args.bench_lengths
                   else demo_batch())
    B, T = batch.input_ids.shape
    opt = make_optimizer(2e-3, warmup_steps=5, total_steps=20)

    def step_variant(g, b, opts=None):
        fn = make_train_step(config, g, opt, lora_scale=lcfg.scaling, donate=False,
                             compiler_options=opts)
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, tree), opt, key)
        return lambda: jax.block_until_ready(fn(state, params, b))

    uni = GRPOConfig(weighting="uniform")
    cut = jax.tree_util.tree_map(lambda x: x[:, :trim] if x.ndim == 2 else x, batch)
    fwd_jit = jax.jit(lambda l, p, b: loss_fn(l, p, b, config=config, lora_scale=lcfg.scaling,
                                              grpo_config=uni))
    variants = {
        "uniform": lambda: step_variant(uni, batch),
        "arca": lambda: step_variant(GRPOConfig(weighting="arca"), batch),
        "fwd": lambda: (lambda: jax.block_until_ready(fwd_jit(tree, params, batch))),
        "width_trim": lambda: step_variant(uni, cut),
        "packed": lambda: step_variant(uni, packing.pack(batch, multiple=16)),
        "packed_arca": lambda: step_variant(GRPOConfig(weighting="arca"),
                                            packing.pack(batch, multiple=16)),
        "packed_arca_w15": lambda: step_variant(GRPOConfig(weighting="arca"), packing.pack(
            batch, multiple=8, width=T * 3 // 2)),
        "packed_arca_w2": lambda: step_variant(GRPOConfig(weighting="arca"), packing.pack(
            batch, multiple=8, width=2 * T)),
        "packed_arca_rule": lambda: step_variant(GRPOConfig(weighting="arca"),
                                                 StepPrograms(None, rows=B).pack(batch)),
        "shared_arca_rule": lambda: step_variant(GRPOConfig(weighting="arca"), StepPrograms(
            None, rows=B, share_prompts=True).pack(batch)),
        "shared_rule": lambda: step_variant(uni, StepPrograms(
            None, rows=B, share_prompts=True).pack(batch)),
        "packed_arca_all": lambda: step_variant(GRPOConfig(weighting="arca"),
                                                packing.pack(batch, lines=B)),
        "chunk_all": lambda: step_variant(GRPOConfig(weighting="uniform", logits_chunk=256), batch),
        "xnn": lambda: step_variant(uni, batch, {"xla_cpu_use_xnnpack": True}),
        "onednn": lambda: step_variant(uni, batch, {"xla_cpu_use_onednn": True}),
        "fastmath": lambda: step_variant(uni, batch, {"xla_cpu_enable_fast_math": True}),
    }
    names = args.variants.split(",") if args.variants else list(variants)
    for n in names:  # packed_arca_at_L: arca packed into L lines
        if n.startswith("packed_arca_at_"):
            variants[n] = (lambda L: lambda: step_variant(GRPOConfig(weighting="arca"),
                                                          packing.pack(batch, lines=L)))(
                int(n[len("packed_arca_at_"):]))
        if n.startswith("shared_arca_b"):  # arca, shared prompts, N attention query blocks
            variants[n] = (lambda nb: lambda: step_variant(
                GRPOConfig(weighting="arca", attention_blocks=nb), StepPrograms(
                    None, rows=B, share_prompts=True).pack(batch)))(int(n[len("shared_arca_b"):]))
        if n.startswith("shared_arca_w"):  # arca, shared prompts, lines of W slots, quarters
            variants[n] = (lambda W: lambda: step_variant(GRPOConfig(weighting="arca"), packing.pack(
                batch, multiple=B // 4, width=W, share_prompts=True)))(int(n[len("shared_arca_w"):]))
    fns = {}
    for n in names:
        t0 = time.perf_counter()
        try:
            f = variants[n]()
            f()
            fns[n] = f
            print(f"{n}: compiled + first call {time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{n}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if args.trace:
        print_trace(fns[args.trace])
        return
    if not args.no_torch:
        fns["torch"] = torch_step(config, params, tree, lcfg, batch)
        fns["torch_trim"] = torch_step(config, params, tree, lcfg, cut)
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    print(f"batch {tuple(batch.input_ids.shape)}, trimmed width {trim}; load {os.getloadavg()[0]:.2f}")
    for n, ts in times.items():
        print(f"{n:12s} median {statistics.median(ts) * 1e3:8.1f} ms   best {min(ts) * 1e3:8.1f} ms")


def print_trace(fn, top=40):
    """Runs fn 3 times under jax.profiler and prints the XLA ops by total time (perfetto JSON)."""
    import collections
    import glob
    import gzip
    import json
    import tempfile

    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(3):
            fn()
    path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))["traceEvents"]
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            tot[e["name"]] += e["dur"]
            cnt[e["name"]] += 1
    for name, us in tot.most_common(top):
        print(f"{us / 3e3:9.2f} ms/call  x{cnt[name] // 3:5d}  {name[:110]}")
    print(f"trace: {path}")


def torch_step(config, params, tree, lcfg, batch):
    import tempfile

    import peft
    import torch
    import transformers

    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp, config, params)
    model = transformers.Qwen3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha,
                                                    target_modules=list(lcfg.targets),
                                                    lora_dropout=0.0))
    pm.train()
    params_t = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params_t, lr=2e-3, weight_decay=0.0)
    ids = torch.as_tensor(np.asarray(batch.input_ids)).long()
    am = torch.as_tensor(np.asarray(batch.attention_mask)).long()
    cm = torch.as_tensor(np.asarray(batch.completion_mask)).float()
    adv = torch.as_tensor(np.asarray(batch.advantages))[:, None]

    def step():
        out = pm(input_ids=ids, attention_mask=am)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = cm[:, 1:]
        loss = -((adv * logp * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_t, 1.0)
        opt.step()

    step()
    return step


if __name__ == "__main__":
    main()
