"""One full RL step of the paper's configuration through the trainer, and `arca-jax plan`'s
estimate of the same run on the same device, side by side (not a test).

The run is `experiments/configs/paper/arca_r64.yaml` (Qwen3-1.7B-Base shapes, LoRA r=64 on the
seven projections, 8 prompts x 4 completions, 512 + 512 tokens, top-k 50, top-p 0.95, ARCA with
sharpening 2, four microbatches, remat) on a checkpoint with the real shapes and random bfloat16
weights, written here in Hugging Face format (config.json, safetensors) with the embedded model's
character tokenizer, and a MATH-format task of synthetic problems whose prompts are 100-400
tokens. Random weights practically never sample the EOS token, so every completion runs to the
512-token limit: the sampling time is the most a step of this configuration can take.

Reported, from the trainer's own metrics.jsonl: per step the time to sample, to score and to
update (steps after the first; the first includes compilation), tokens/s and peak device memory;
then `arca-jax plan` for the local device with the same config (its compiled memory per program
and roofline seconds), so the estimate can be read against the measurement.

    python experiments/bench_rl_step.py [--steps 3] [--skip-plan] [--set grpo.remat=projections]

Writes $OUT/bench_rl_step.json when OUT is set (else --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arca_jax import config as run_config  # noqa: E402
from arca_jax import hf, qwen3  # noqa: E402
from arca_jax.trainer import train  # noqa: E402
import results_io  # noqa: E402

PAPER = os.path.join(REPO, "experiments", "configs", "paper", "arca_r64.yaml")
TOKENIZER = os.path.join(REPO, "arca_jax", "assets", "tiny-arith")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("find", "the", "value", "of", "x", "if", "sum", "integer", "triangle", "area", "let",
         "prime", "compute", "number", "real", "such", "that", "each", "circle", "radius")


def write_checkpoint(path: str, preset: str, tiny: bool) -> qwen3.Qwen3Config:
    """A Hugging Face Qwen3 directory with `preset`'s shapes (or a small model with `tiny`),
    random bfloat16 weights (normal(0.02), unit norms) and the embedded character tokenizer."""
    if tiny:
        config = qwen3.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, eos_token_id=1)
    else:
        config = qwen3.preset(preset)
    params = jax.jit(lambda k: qwen3.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    hf.save_pretrained(path, config, params)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER, name), path)
    return config


def write_task(path: str, n: int = 64, seed: int = 0) -> None:
    """`n` MATH-format problems (train.jsonl, test.jsonl): words adding up to 100-400 characters
    (the character tokenizer: that many prompt tokens plus the instruction), boxed answers."""
    rs = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for split in ("train", "test"):
        with open(os.path.join(path, split + ".jsonl"), "w") as f:
            for i in range(n):
                target = int(rs.integers(100, 401))
                words = []
                while sum(len(w) + 1 for w in words) < target:
                    words.append(str(rs.choice(WORDS)))
                answer = int(rs.integers(0, 100))
                f.write(json.dumps({"problem": " ".join(words) + "?",
                                    "solution": f"So the answer is $\\boxed{{{answer}}}$."}) + "\n")


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="RL steps (the first compiles)")
    ap.add_argument("--preset", default="Qwen3-1.7B")
    ap.add_argument("--tiny", action="store_true", help="a small model and short lengths, any "
                                                        "backend, to check the code path")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--plan-timeout", type=float, default=240.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override on top of the paper's (repeatable), e.g. "
                         "grpo.remat=projections")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out_path = results_io.json_path(args.json, "bench_rl_step.json")
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="arca_rl_step_")
    model_dir, task_dir, run_dir = (os.path.join(work, d) for d in ("model", "task", "run"))
    t = time.perf_counter()
    write_checkpoint(model_dir, args.preset, args.tiny)
    write_task(task_dir)
    setup_s = time.perf_counter() - t
    overrides = [f"model.path={model_dir}", f"task.path={task_dir}", f"train.steps={args.steps}",
                 "task.num_eval_problems=0", "train.save_every=0", "train.samples_every=0",
                 "task.reward_timeout_s=5"]
    if args.tiny:
        overrides += ["rollout.max_prompt_tokens=64", "rollout.max_new_tokens=32",
                      "lora.rank=4", "lora.alpha=8"]
    overrides += args.set
    cfg = run_config.load(PAPER, overrides)
    dev = jax.devices()[0]
    res = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
               config=os.path.relpath(PAPER, REPO), overrides=overrides,
               model="tiny" if args.tiny else f"{args.preset} shapes, random bfloat16 weights",
               setup_s=setup_s, note=("random weights: every completion runs to "
                                      "max_new_tokens (EOS practically never sampled)"))

    def save():
        results_io.write_json(out_path, res)

    print(f"{dev.device_kind}: checkpoint and task written in {setup_s:.1f} s", flush=True)
    t = time.perf_counter()
    train(cfg, run_dir)
    res["train_wall_s"] = time.perf_counter() - t
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "step" in r
            and "time_update_s" in r]
    keys = ("step", "step_time_s", "time_sample_s", "time_score_s", "time_update_s",
            "tokens_per_s", "sample_tokens_per_s", "slot_utilisation", "completion_length",
            "completions_truncated",
            "reward_mean")
    res["steps"] = [{k: r.get(k) for k in keys} for r in rows]
    stats = dev.memory_stats() or {}
    res["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    later = rows[1:] or rows
    for k in ("step_time_s", "time_sample_s", "time_score_s", "time_update_s"):
        res[f"median_{k}"] = float(np.median([r[k] for r in later]))
    print(f"trainer: {len(rows)} steps in {res['train_wall_s']:.1f} s; after the first, median "
          f"step {res['median_step_time_s']:.2f} s = sample {res['median_time_sample_s']:.2f} + "
          f"score {res['median_time_score_s']:.2f} + update {res['median_time_update_s']:.2f} s; "
          f"peak device memory {(res['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB", flush=True)
    for r in res["steps"]:
        print("  " + json.dumps(r), flush=True)
    save()
    if not args.skip_plan:
        cmd = [sys.executable, "-m", "arca_jax", "plan", "--config", PAPER, "--json"]
        for o in overrides:
            cmd += ["--set", o]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.plan_timeout,
                               cwd=REPO)
            res["plan_s"] = time.perf_counter() - t
            res["plan_rc"] = p.returncode
            try:
                res["plan"] = json.loads(p.stdout)
            except json.JSONDecodeError:
                res["plan_stdout"] = p.stdout[-4000:]
            res["plan_stderr"] = p.stderr[-2000:]
        except subprocess.TimeoutExpired:
            res["plan_error"] = f"timed out after {args.plan_timeout:.0f} s"
        print(f"plan: rc {res.get('plan_rc')} in {res.get('plan_s', 0):.0f} s "
              f"{res.get('plan_error', '')}", flush=True)
        plan = res.get("plan", {}).get("plan")
        if plan:
            print(f"  plan: peak {plan['peak_gib_per_device']} GiB per device, fits "
                  f"{plan['fits']}, update {plan['update_s']} s, rollout {plan['rollout_s']} s, "
                  f"step {plan['step_s']} s (roofline estimates)", flush=True)
            for prog in plan["programs"]:
                print(f"    {prog['name']}: peak {prog['memory_bytes']['peak'] / 2**30:.2f} GiB, "
                      f"roofline {prog['roofline_s']} s ({prog['bound']}-bound), runs per step "
                      f"{prog['runs_per_step']}", flush=True)
        save()
    res["total_s"] = time.perf_counter() - t_start
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(f"total {res['total_s']:.0f} s" + (f"; JSON: {out_path}" if out_path else ""))


if __name__ == "__main__":
    main()
