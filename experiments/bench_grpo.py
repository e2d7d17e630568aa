"""Cost of the GRPO step (`arca_jax.grpo.make_train_step`), not a test.

CPU (default): one random model (hidden 256, 4 layers, 8 heads / 4 KV heads, head_dim 32, vocab
8192, MLP 768), LoRA r = 16 (alpha 32) on all seven projections, 16 sequences of 128 tokens of
which 96 are completion (32 prompt), float32, AdamW + clipping. Measured side by side in one run,
every variant warmed up, rounds interleaved, medians reported:
  - ours, weighting="arca" (gradient forward + one shared no-grad base forward) and
    weighting="uniform" (gradient forward only): the ratio arca / uniform;
  - the paper's reference structure in PyTorch + PEFT on the same weights and batch: no-grad
    forward with the adapter on and one with it off (h_adapted, h_base), ARCA weights, then
    forward + backward of the weighted loss over full [B, T, V] logits, clipping, AdamW step.
Reported per variant: best and median wall time per step, and the median of per-round paired
ratios (robust when other processes share the machine); process CPU time too.

    python experiments/bench_grpo.py [--rounds 10]

GPU (`--gpu`): Qwen3-1.7B shapes, random bfloat16 base, LoRA r = 64 on all seven projections,
8 sequences x 1024 tokens (512 prompt + 512 completion): step time and model-FLOPs
utilisation (forward, backward and the extra base forward, counted analytically; also under the
"6N" convention that charges weight gradients of the frozen base too; XLA's cost-analysis flops
are stored for reference only: they count a scanned loop body once). Variants: arca with remat,
arca without remat (more memory, no recompute: an out-of-memory error is reported, not fatal),
then uniform with remat; a variant is not started after --budget-s (120 s) have passed.
Runs in well under 4 minutes; writes $OUT/bench_grpo_gpu.json when OUT is set (after every
variant). `--gpu --tiny` runs the same code path with tiny shapes on any backend, to check it.

    python experiments/bench_grpo.py --gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--gpu" in sys.argv:  # before jax loads: let the no-remat variant use most of the HBM
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax import lora, qwen3  # noqa: E402
from arca_jax.grpo import (Batch, GRPOConfig, TrainState, make_optimizer,  # noqa: E402
                           make_train_step)

T_START = time.perf_counter()


def now() -> float:
    return time.perf_counter()


def machine() -> dict:
    info = dict(python=platform.python_version(), jax=jax.__version__,
                backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()][:1],
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def make_batch(B, T, prompt, vocab, seed=0):
    """Prompts left-padded to `prompt` (lengths prompt/2..prompt), completions of T - prompt
    tokens (every row full length, as in the issue's setting), random advantages."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    for b in range(B):
        pad = int(rng.integers(0, prompt // 2 + 1)) if prompt > 1 else 0
        am[b, :pad] = 0
        ids[b, :pad] = 0
    cm = np.zeros((B, T), np.int32)
    cm[:, prompt:] = 1
    adv = rng.normal(size=B).astype(np.float32)
    return ids, am, cm, adv


def random_lora(config, lcfg, key, b_scale=0.02):
    """PEFT-style init with a random (non-zero) B so that the adapter acts (ARCA's residual > 0)."""
    tree = lora.init_lora(config, lcfg, key)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: b_scale * jax.random.normal(jax.random.fold_in(key, len(str(p))), x.shape,
                                                 x.dtype) if "lora_b" in str(p) else x, tree)


# --------------------------------------------------------------------------------------------
# CPU: ours (arca, uniform) vs the reference structure in PyTorch + PEFT
# --------------------------------------------------------------------------------------------

CPU_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0)


def torch_reference(config, params, tree, lcfg, batch_np, lr=5e-6):
    """A step closure of the paper's reference structure (PyTorch + PEFT, CPU, float32)."""
    import peft
    import torch
    import transformers

    from arca_jax import hf

    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp, config, params)
    model = transformers.Qwen3ForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=lcfg.rank, lora_alpha=lcfg.alpha, target_modules=list(lcfg.targets), lora_dropout=0.0))
    with torch.no_grad():  # the same adapter weights as ours
        for layer, blk in enumerate(pm.base_model.model.model.layers):
            for proj in lcfg.targets:
                block = qwen3.PROJ_BLOCK[proj]
                mod = getattr(getattr(blk, block), proj)
                ab = tree["layers"][block][proj]
                mod.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ab["lora_a"][layer]).T))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ab["lora_b"][layer]).T))
    pm.train()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    ids, am, cm, adv = (torch.as_tensor(x) for x in batch_np)
    ids, am, cm = ids.long(), am.long(), cm.long()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    mask = (cm[:, 1:] * am[:, 1:]).float()
    A = adv[:, None]

    def step():
        with torch.no_grad():  # the reference's two extra forwards: adapter on, adapter off
            h_on = pm(input_ids=ids, attention_mask=am, position_ids=pos,
                      output_hidden_states=True).hidden_states[-1]
            with pm.disable_adapter():
                h_off = pm(input_ids=ids, attention_mask=am, position_ids=pos,
                           output_hidden_states=True).hidden_states[-1]
            alpha = (h_on[:, :-1] - h_off[:, :-1]).norm(dim=-1)
            w = ((alpha + 1e-8) ** 2.0) * mask
            w = w / w.sum(1, keepdim=True).clamp(min=1e-30)
        out = pm(input_ids=ids, attention_mask=am, position_ids=pos)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(
            -1, ids[:, 1:, None])[..., 0]
        loss = -(A * (w * logp * mask).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss.detach())

    return step, torch.get_num_threads()


def bench_cpu(args):
    config = qwen3.Qwen3Config(**CPU_MODEL)
    lcfg = lora.LoraConfig(rank=16, alpha=32.0)
    B, T, prompt = 16, 128, 32
    key = jax.random.PRNGKey(0)
    params = jax.jit(lambda k: qwen3.init_params(config, k))(key)
    tree = jax.jit(lambda k: random_lora(config, lcfg, k))(jax.random.PRNGKey(1))
    batch_np = make_batch(B, T, prompt, config.vocab_size)
    batch = Batch(*(jnp.asarray(x) for x in batch_np))
    opt = make_optimizer(5e-6, warmup_steps=0, total_steps=10_000)

    steps, states = {}, {}
    for w in ("arca", "uniform"):
        g = GRPOConfig(weighting=w, sharpening=2.0)
        steps[w] = make_train_step(config, g, opt, lora_scale=lcfg.scaling)
        states[w] = TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                      jax.random.PRNGKey(2))
    ref_step, torch_threads = torch_reference(config, params, tree, lcfg, batch_np)

    compile_s = {}
    for w in steps:  # compile + warm up
        t = now()
        states[w], m = steps[w](states[w], params, batch)
        jax.block_until_ready(m)
        compile_s[w] = now() - t
        for _ in range(2):
            states[w], m = steps[w](states[w], params, batch)
        jax.block_until_ready(m)
    for _ in range(2):
        ref_step()

    times = {"arca": [], "uniform": [], "torch_reference": []}
    cpu = {"arca": [], "uniform": [], "torch_reference": []}

    def run(name):
        t, c = now(), time.process_time()
        if name == "torch_reference":
            ref_step()
        else:
            states[name], m = steps[name](states[name], params, batch)
            jax.block_until_ready(m)
        times[name].append(now() - t)
        cpu[name].append(time.process_time() - c)

    order = ["arca", "uniform", "torch_reference"]
    for r in range(args.rounds):  # interleaved, order reversed every other round
        for name in (order if r % 2 == 0 else order[::-1]):
            run(name)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # paired ratios: the variants of one round ran seconds apart, under similar load
    pair_au = statistics.median(a / u for a, u in zip(times["arca"], times["uniform"]))
    pair_ra = statistics.median(t / a for t, a in zip(times["torch_reference"], times["arca"]))
    res = dict(
        kind="cpu", machine=machine(), torch_threads=torch_threads,
        setting=dict(model=CPU_MODEL, lora_rank=16, batch=B, seq=T, completion=T - prompt,
                     dtype="float32", sharpening=2.0, rounds=args.rounds),
        compile_s=compile_s, median_s=med, best_s=best, all_s=times,
        median_process_cpu_s={k: statistics.median(v) for k, v in cpu.items()},
        arca_over_uniform=dict(best=best["arca"] / best["uniform"],
                               median=med["arca"] / med["uniform"], paired_median=pair_au),
        reference_over_arca=dict(best=best["torch_reference"] / best["arca"],
                                 median=med["torch_reference"] / med["arca"],
                                 paired_median=pair_ra),
    )
    print(f"machine: {res['machine']}")
    for k in med:
        print(f"{k:16s} best {1e3 * best[k]:8.1f}  median {1e3 * med[k]:8.1f} ms/step  "
              f"(median process CPU {1e3 * res['median_process_cpu_s'][k]:.0f} ms)")
    au, ra = res["arca_over_uniform"], res["reference_over_arca"]
    print(f"arca / uniform           best {au['best']:.3f}  median {au['median']:.3f}  "
          f"paired {au['paired_median']:.3f}   (goal <= 1.25)")
    print(f"reference (torch) / arca best {ra['best']:.2f}x  median {ra['median']:.2f}x  "
          f"paired {ra['paired_median']:.2f}x  (goal >= 1.3)")
    return res


# --------------------------------------------------------------------------------------------
# GPU: MFU for Qwen3-1.7B shapes
# --------------------------------------------------------------------------------------------

# Dense bf16 peak (no sparsity), FLOP/s, by device_kind substring.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12)]


def model_flops(config, B, T, scored, lora_params, weighting):
    """Model FLOPs of one step that the method needs (no remat recompute, no weight gradients of
    the frozen base): policy forward, its backward (activation gradients everywhere, weight
    gradients for LoRA only), and the base forward when the weighting needs it.

    scored: positions per row whose logits are computed (completion tokens), for the LM head.
    Attention is counted over the full T x T score matrix, as computed.
    """
    c = config
    D, F, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    NH, KH = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    body = L * (D * NH + 2 * D * KH + NH * D + 3 * D * F)  # matmul weights per token
    tokens = B * T
    attn = 4 * B * T * T * NH * L  # QK^T and PV, forward
    head = 2 * B * scored * D * c.vocab_size
    fwd_policy = 2 * tokens * (body + lora_params) + attn + head
    bwd_policy = 2 * tokens * (body + lora_params) + 2 * attn + head + 2 * tokens * lora_params
    base = 2 * tokens * body + attn if weighting in ("arca", "divergence") else 0
    return dict(forward=fwd_policy, backward=bwd_policy, base_forward=base,
                total=fwd_policy + bwd_policy + base,
                six_n_convention=6 * tokens * (body + c.vocab_size * D) + 3 * attn
                + (2 * tokens * body + attn if base else 0))


def bench_gpu(args):
    tiny = args.tiny
    if tiny:
        config = qwen3.Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32)
        B, T, prompt, rank, steps_n = 2, 64, 32, 8, 2
    else:
        config = qwen3.preset("Qwen3-1.7B")
        B, T, prompt, rank, steps_n = 8, 1024, 512, 64, args.steps
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16 if k in kind), None)
    res = dict(kind="gpu-tiny" if tiny else "gpu", machine=machine(), device_kind=kind,
               peak_bf16_flops=peak, setting=dict(model="tiny" if tiny else "Qwen3-1.7B",
                                                  batch=B, seq=T, prompt=prompt, lora_rank=rank,
                                                  dtype="bfloat16"), variants=[])
    out_path = args.json or (os.path.join(os.environ["OUT"], "bench_grpo_gpu.json")
                             if os.environ.get("OUT") else None)

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(res, f, indent=2)

    t = now()
    params = jax.jit(lambda k: qwen3.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    tree = jax.jit(lambda k: random_lora(config, lcfg, k))(jax.random.PRNGKey(1))
    batch = Batch(*(jnp.asarray(x) for x in make_batch(B, T, prompt, config.vocab_size)))
    jax.block_until_ready((params, tree))
    res["init_s"] = now() - t
    print(f"{kind}: init {res['init_s']:.1f} s", flush=True)
    opt = make_optimizer(5e-6, warmup_steps=0, total_steps=10_000)
    lora_n = lora.count_params(tree)

    variants = [("arca", True), ("arca", False), ("uniform", True)]
    for weighting, remat in variants:
        elapsed = now() - T_START
        if elapsed > args.budget_s:
            res["variants"].append(dict(weighting=weighting, remat=remat,
                                        skipped=f"time budget ({elapsed:.0f} s used)"))
            save()
            continue
        g = GRPOConfig(weighting=weighting, sharpening=2.0, remat=remat)
        step = make_train_step(config, g, opt, lora_scale=lcfg.scaling)
        state = TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                  jax.random.PRNGKey(2))
        v = dict(weighting=weighting, remat=remat)
        try:
            t = now()
            compiled = step.lower(state, params, batch).compile()
            v["compile_s"] = now() - t
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            v["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else None
            ma = compiled.memory_analysis()
            if ma is not None:
                v["xla_peak_gib"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                     - ma.alias_size_in_bytes + ma.temp_size_in_bytes) / 2**30
            state, m = compiled(state, params, batch)  # warm-up
            jax.block_until_ready(m)
            times = []
            for _ in range(steps_n):
                t = now()
                state, m = compiled(state, params, batch)
                jax.block_until_ready(m)
                times.append(now() - t)
            v["step_s"] = statistics.median(times)
            v["all_s"] = times
            v["loss"] = float(m.loss)
            v["weight_gini"] = float(m.weight_gini)
            fl = model_flops(config, B, T, T - prompt, lora_n, weighting)
            v["model_flops"] = fl
            v["tokens_per_s"] = B * T / v["step_s"]
            if peak:
                v["mfu"] = fl["total"] / v["step_s"] / peak
                v["mfu_6n_convention"] = fl["six_n_convention"] / v["step_s"] / peak
            print(f"{weighting:8s} remat={remat!s:5s} compile {v['compile_s']:.0f} s, "
                  f"step {1e3 * v['step_s']:.1f} ms, {v['tokens_per_s']:.0f} tok/s, "
                  f"MFU {100 * v.get('mfu', float('nan')):.1f}% "
                  f"(6N convention {100 * v.get('mfu_6n_convention', float('nan')):.1f}%)",
                  flush=True)
        except Exception as e:  # e.g. out of memory without remat: report, keep going
            v["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{weighting} remat={remat}: {v['error']}", flush=True)
        res["variants"].append(v)
        del state
        save()
    done = [v for v in res["variants"] if "step_s" in v]
    by = {(v["weighting"], v["remat"]): v for v in done}
    if ("arca", True) in by and ("uniform", True) in by:
        res["arca_over_uniform"] = by[("arca", True)]["step_s"] / by[("uniform", True)]["step_s"]
        print(f"arca / uniform (remat) = {res['arca_over_uniform']:.3f}")
    res["total_s"] = now() - T_START
    save()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the accelerator MFU benchmark")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny shapes, any backend")
    ap.add_argument("--rounds", type=int, default=10, help="CPU: interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=5, help="GPU: timed steps per variant")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="GPU: start no new variant after this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU: dense bf16 peak of the device (default: by device kind)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.gpu:
        bench_gpu(args)
        return
    res = bench_cpu(args)
    out = args.json or (os.path.join(os.environ["OUT"], "bench_grpo_cpu.json")
                        if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
