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
8 sequences x 1024 tokens (512 prompt + 512 completion), ARCA with sharpening 2: step time and
model-FLOPs utilisation (forward, backward and the extra base forward, counted analytically, no
remat recompute; also under the "6N" convention that charges weight gradients of the frozen base
too; XLA's cost-analysis flops are stored for reference only: they count a scanned loop body
once). One run times the variants of GPU_VARIANTS in order: "all" (the defaults: cuDNN flash
attention, bf16 LoRA matmuls, bf16 head backward; remat=True), "baseline" (the previous step:
einsum attention, float32 LoRA matmuls, float32 head cotangent), then remat="projections",
no remat, each lever taken out of "all" in turn, uniform weighting, a larger logits chunk and
LoRA dropout 0.05. A variant is not started after --budget-s (180 s), nor when the slowest
variant so far would carry it past --deadline-s (215 s), so the run ends in under 4 minutes with
compilation; an error (out of memory, a cuDNN refusal) is recorded and the run goes on. Each
variant's first step runs on the same state and batch, and the table compares its loss and
gradient norm with the baseline's (a correctness check of the fast paths on the device). Prints
a table last; writes $OUT/bench_grpo_gpu.json when OUT is set (after every variant).
`--gpu --tiny` runs the same code path with tiny shapes on any backend (off CUDA the fused
attention variants run the same row layout through jax's XLA kernel, attention="sdpa-xla").

    python experiments/bench_grpo.py --gpu [--variants all,baseline]
"""

from __future__ import annotations

import argparse
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
import results_io  # noqa: E402

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
    Attention is counted over the full T x T score matrix (the einsum path computes all of it;
    cuDNN's causal kernel skips the upper half): `total`. `total_causal_attention` counts half
    of the attention FLOPs instead (the stricter figure for a causal kernel).
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
    total = fwd_policy + bwd_policy + base
    attn_all = 3 * attn + (attn if base else 0)
    return dict(forward=fwd_policy, backward=bwd_policy, base_forward=base, total=total,
                total_causal_attention=total - attn_all // 2,
                six_n_convention=6 * tokens * (body + c.vocab_size * D) + 3 * attn
                + (2 * tokens * body + attn if base else 0))


# The variants of one `--gpu` run, most important first (a variant is not started when the time
# budget would not cover it). GRPOConfig fields on top of weighting="arca", sharpening=2.0; "all"
# is the new default (attention="auto" = cuDNN flash attention on a CUDA GPU, LoRA matmuls in
# bf16, bf16 head backward); "baseline" is the previous step (einsum attention, float32 LoRA
# matmuls, float32 head cotangent); "-x" variants take one lever back out of "all".
GPU_VARIANTS = [
    ("all", dict(remat=True), {}),
    ("baseline", dict(remat=True, attention="einsum", lora_dtype="float32",
                      logits_grad_dtype="float32"), {}),
    ("all+remat_proj", dict(remat="projections"), {}),
    ("all+no_remat", dict(remat=False), {}),
    ("all-lora_bf16", dict(remat=True, lora_dtype="float32"), {}),
    ("all-cudnn", dict(remat=True, attention="einsum"), {}),
    ("all-head_bf16", dict(remat=True, logits_grad_dtype="float32"), {}),
    ("uniform+remat_proj", dict(weighting="uniform", remat="projections"), {}),
    ("all+remat_proj+chunk256", dict(remat="projections", logits_chunk=256), {}),
    ("all+remat_proj+dropout", dict(remat="projections"), dict(lora_dropout=0.05)),
    ("all+remat_proj+cublas", dict(remat="projections"), {}),
    ("all+remat_proj+unrolled", dict(remat="projections", scan_layers=False), {}),
    ("all+no_remat+unrolled", dict(remat=False, scan_layers=False), {}),
]
# XLA options of a variant's compile (`Lowered.compile(compiler_options=...)`): "+cublas" leaves
# every matmul to cuBLAS instead of XLA's Triton GEMM fusions.
GPU_COMPILER_OPTIONS = {"all+remat_proj+cublas": {"xla_gpu_enable_triton_gemm": False}}

# Kernel-name fragments of the profile account's categories, first match wins.
KERNEL_CATEGORIES = (
    ("attention (cuDNN / flash)", ("sdpa", "flash", "fmha", "cudnn")),
    ("matmul (cuBLAS / CUTLASS / Triton GEMM)", ("gemm", "nvjet", "cutlass", "xmma", "cublas",
                                                 "sm90_", "dot")),
    ("copies and memsets", ("memcpy", "memset", "copy", "transpose")),
    ("fusions (elementwise, reductions)", ("fusion", "loop_", "reduce", "triton", "convert",
                                          "concatenate", "scatter", "gather", "select")),
)


def kernel_account(xplane_path: str, steps: int, wall_s: float,
                   categories=KERNEL_CATEGORIES) -> dict:
    """Where the device time of `steps` traced steps goes, from a profiler trace
    (`jax.profiler.trace`): the GPU planes' kernel events grouped by `categories` ((name,
    name fragments), first match wins), the time the device was busy (union of kernel intervals)
    and idle, per step, the kernel launches per step, and the kernels that took the most time.
    `wall_s`: host wall time of the traced steps."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    by_name, intervals, launches = {}, [], 0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():  # kernels and copies run on the streams
                continue
            for e in line.events:
                by_name[e.name] = by_name.get(e.name, 0.0) + e.duration_ns
                launches += 1
                intervals.append((e.start_ns, e.start_ns + e.duration_ns))
    intervals.sort()
    busy, end = 0.0, -1.0
    for a, b in intervals:  # union length
        if b > end:
            busy += b - max(a, end)
            end = b
    cats = {}
    for name, ns in by_name.items():
        low = name.lower()
        cat = next((c for c, keys in categories if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ns
    per = 1e6 * steps  # ns -> ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return dict(steps=steps, wall_ms_per_step=1e3 * wall_s / steps,
                kernel_ms_per_step=sum(by_name.values()) / per, busy_ms_per_step=busy / per,
                idle_ms_per_step=1e3 * wall_s / steps - busy / per,
                categories_ms_per_step={c: ns / per for c, ns in
                                        sorted(cats.items(), key=lambda kv: -kv[1])},
                top_kernels_ms_per_step=[(n[:160], ns / per) for n, ns in top],
                kernels=len(by_name), kernel_launches_per_step=launches / steps)


def profile_steps(compiled, state, params, batch, steps: int = 2):
    """Traces `steps` calls of `compiled` and returns (state, `kernel_account`)."""
    import glob

    with tempfile.TemporaryDirectory() as d:
        t = now()
        with jax.profiler.trace(d):
            for _ in range(steps):
                state, m = compiled(state, params, batch)
            jax.block_until_ready((state, m))
        wall = now() - t
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError("the profiler wrote no trace")
        return state, kernel_account(paths[0], steps, wall)


def _cudnn_version():
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        return check_cudnn_version()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({type(e).__name__})"


def _table(res) -> str:
    base = next((v for v in res["variants"] if v["name"] == "baseline" and "step_s" in v), None)
    ref = base or next((v for v in res["variants"] if "step_s" in v), None)
    head = (f"{'variant':26s} {'ms/step':>8s} {'vs base':>8s} {'MFU':>6s} {'causal':>7s} {'6N':>6s} "
            f"{'peak GiB':>8s} {'compile':>8s} {'d loss':>8s} {'d gnorm':>8s}")
    lines = [head, "-" * len(head)]
    for v in res["variants"]:
        if "step_s" not in v:
            why = v.get("skipped") or v.get("error", "?")
            lines.append(f"{v['name']:26s} {why[:100]}")
            continue
        rel = lambda k: (abs(v["first_step"][k] - ref["first_step"][k])  # noqa: E731
                         / max(abs(ref["first_step"][k]), 1e-30)) if ref else float("nan")
        lines.append(
            f"{v['name']:26s} {1e3 * v['step_s']:8.1f} "
            f"{(base['step_s'] / v['step_s']) if base else float('nan'):7.2f}x "
            f"{100 * v.get('mfu', float('nan')):5.1f}% "
            f"{100 * v.get('mfu_causal_attention', float('nan')):6.1f}% "
            f"{100 * v.get('mfu_6n_convention', float('nan')):5.1f}% "
            f"{v.get('xla_peak_gib', float('nan')):8.2f} {v['compile_s']:7.0f}s "
            f"{rel('loss'):8.1e} {rel('grad_norm'):8.1e}")
    lines.append("vs base: baseline step time / this one. d loss, d gnorm: relative difference of the "
                 "first step's loss and gradient norm from the baseline's (same state and batch; "
                 "bf16 rounding is ~1e-2; other weightings and dropout differ by design). MFU: model "
                 "FLOPs (no recompute, full T x T attention) / time / dense bf16 peak; causal: "
                 "attention FLOPs halved; 6N: frozen-weight gradients charged too.")
    return "\n".join(lines)


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
    cuda = qwen3.on_cuda()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16 if k in kind), None)
    res = dict(kind="gpu-tiny" if tiny else "gpu", machine=machine(), device_kind=kind,
               cudnn=_cudnn_version() if cuda else None, xla_flags=os.environ.get("XLA_FLAGS"),
               peak_bf16_flops=peak, setting=dict(model="tiny" if tiny else "Qwen3-1.7B",
                                                  batch=B, seq=T, prompt=prompt, lora_rank=rank,
                                                  dtype="bfloat16", sharpening=2.0),
               budget_s=args.budget_s, deadline_s=args.deadline_s, variants=[])
    out_path = results_io.json_path(args.json, "bench_grpo_gpu.json")

    def save():
        results_io.write_json(out_path, res)

    t = now()
    params = jax.jit(lambda k: qwen3.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    tree = jax.jit(lambda k: random_lora(config, lcfg, k))(jax.random.PRNGKey(1))
    batch = Batch(*(jnp.asarray(x) for x in make_batch(B, T, prompt, config.vocab_size)))
    jax.block_until_ready((params, tree))
    res["init_s"] = now() - t
    print(f"{kind} (cuDNN {res['cudnn']}): init {res['init_s']:.1f} s", flush=True)
    opt = make_optimizer(5e-6, warmup_steps=0, total_steps=10_000)
    lora_n = lora.count_params(tree)

    wanted = args.variants.split(",") if args.variants else [n for n, _, _ in GPU_VARIANTS]
    table = {n: (g, kw) for n, g, kw in GPU_VARIANTS}
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(table)}")
    profiled = set(args.profile.split(",")) if args.profile else set()
    cost_s = []  # wall time of each finished variant (compile + runs)
    for name in wanted:
        overrides, step_kw = table[name]
        g_kw = {"weighting": "arca", "sharpening": 2.0, **overrides}
        if not cuda and g_kw.get("attention", "auto") == "auto":
            g_kw["attention"] = "sdpa-xla"  # off CUDA: exercise the rotated fused-attention path
        v = dict(name=name, grpo={k: g_kw[k] for k in sorted(g_kw)}, step_kwargs=step_kw)
        elapsed = now() - T_START
        estimate = max(cost_s) if cost_s else 0.0
        if elapsed > args.budget_s or elapsed + estimate > args.deadline_s:
            v["skipped"] = (f"time budget: {elapsed:.0f} s used, the last variants took up to "
                            f"{estimate:.0f} s (budget {args.budget_s:.0f}, deadline "
                            f"{args.deadline_s:.0f})")
            print(f"{name}: {v['skipped']}", flush=True)
            res["variants"].append(v)
            save()
            continue
        t_variant = now()
        state = None
        try:
            g = GRPOConfig(**g_kw)
            v["attention_impl"] = qwen3.resolve_attention(g.attention, jnp.bfloat16)
            step = make_train_step(config, g, opt, lora_scale=lcfg.scaling, **step_kw)
            state = TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                      jax.random.PRNGKey(2))
            t = now()
            compiled = step.lower(state, params, batch).compile(
                compiler_options=GPU_COMPILER_OPTIONS.get(name) if cuda else None)
            v["compile_s"] = now() - t
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            v["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else None
            ma = compiled.memory_analysis()
            if ma is not None:
                v["xla_peak_gib"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                     - ma.alias_size_in_bytes + ma.temp_size_in_bytes) / 2**30
            state, m = compiled(state, params, batch)  # first step: same state and batch for all
            m = jax.device_get(m)
            v["first_step"] = {k: float(getattr(m, k)) for k in (
                "loss", "grad_norm", "weight_gini", "residual_norm_mean", "entropy")}
            times = []
            for _ in range(steps_n):
                t = now()
                state, m = compiled(state, params, batch)
                jax.block_until_ready(m)
                times.append(now() - t)
            v["step_s"] = statistics.median(times)
            v["all_s"] = times
            v["finite"] = bool(np.isfinite(float(m.loss)) and int(m.skipped_steps) == 0)
            fl = model_flops(config, B, T, T - prompt, lora_n, g.weighting)
            v["model_flops"] = fl
            v["tokens_per_s"] = B * T / v["step_s"]
            if peak:
                v["mfu"] = fl["total"] / v["step_s"] / peak
                v["mfu_6n_convention"] = fl["six_n_convention"] / v["step_s"] / peak
                v["mfu_causal_attention"] = fl["total_causal_attention"] / v["step_s"] / peak
            if name in profiled:
                state, v["profile"] = profile_steps(compiled, state, params, batch)
                acc = v["profile"]
                print(f"  profile of {name}: {acc['wall_ms_per_step']:.1f} ms/step traced, device "
                      f"busy {acc['busy_ms_per_step']:.1f} ms, idle {acc['idle_ms_per_step']:.1f} "
                      "ms; " + ", ".join(f"{c} {ms:.1f} ms" for c, ms in
                                         acc["categories_ms_per_step"].items()), flush=True)
            print(f"{name:26s} [{v['attention_impl']}] compile {v['compile_s']:.0f} s, "
                  f"step {1e3 * v['step_s']:.1f} ms, MFU {100 * v.get('mfu', float('nan')):.1f}%, "
                  f"peak {v.get('xla_peak_gib', float('nan')):.2f} GiB, "
                  f"first loss {v['first_step']['loss']:.6g} gnorm "
                  f"{v['first_step']['grad_norm']:.6g}", flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory, a cuDNN refusal: report, go on
            v["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"{name}: {v['error']}", flush=True)
        cost_s.append(now() - t_variant)
        v["wall_s"] = cost_s[-1]
        res["variants"].append(v)
        del state
        save()
    by = {v["name"]: v for v in res["variants"] if "step_s" in v}
    for a, u in (("all+remat_proj", "uniform+remat_proj"),):
        if a in by and u in by:
            res["arca_over_uniform"] = by[a]["step_s"] / by[u]["step_s"]
    res["total_s"] = now() - T_START
    save()
    print("\n" + _table(res))
    if "arca_over_uniform" in res:
        print(f"arca / uniform (remat=projections) = {res['arca_over_uniform']:.3f}")
    print(f"total {res['total_s']:.0f} s" + (f"; JSON: {out_path}" if out_path else ""), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the accelerator MFU benchmark")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny shapes, any backend")
    ap.add_argument("--rounds", type=int, default=10, help="CPU: interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=5, help="GPU: timed steps per variant")
    ap.add_argument("--budget-s", type=float, default=180.0,
                    help="GPU: start no new variant after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=215.0,
                    help="GPU: nor one that would end after this, judged by the slowest so far")
    ap.add_argument("--variants", default=None,
                    help="GPU: comma-separated variant names (default: all, in order): "
                         + ", ".join(n for n, _, _ in GPU_VARIANTS))
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU: dense bf16 peak of the device (default: by device kind)")
    ap.add_argument("--profile", default="all,all+remat_proj",
                    help="GPU: variants whose two extra steps are traced (`kernel_account`)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.gpu:
        bench_gpu(args)
        return
    res = bench_cpu(args)
    results_io.write_json(results_io.json_path(args.json, "bench_grpo_cpu.json"), res)


if __name__ == "__main__":
    main()
