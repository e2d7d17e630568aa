"""One RL step of arca-jax against TRL's GRPOTrainer on the same CPU (issue 19).

The same run three ways, one after the other, each in its own process:
  arca-uniform  `python -m arca_jax train` with grpo.weighting=uniform
  arca-arca     `python -m arca_jax train` with grpo.weighting=arca
  trl           TRL 1.16 `GRPOTrainer` (loss_type="grpo", transformers `generate`, no vLLM) on the
                same checkpoint loaded with transformers + PEFT (this file, `--trl-child`)
Settings come from one record, `BenchSettings`, mapped onto `--set` overrides
(`arca_overrides`) and onto `GRPOConfig` / `peft.LoraConfig` (`trl_config_kwargs`,
`trl_lora_kwargs`): the embedded tiny Qwen3 arithmetic model (arca_jax/assets/tiny-arith),
LoRA r=8 alpha=16 on the seven projections (no dropout), 16 prompts x 8 completions, 80 new
tokens, temperature 1 (no top-k, no top-p), the arithmetic task's reward, AdamW 2e-3 with 5
warmup steps then cosine to 0, max grad norm 1, no KL, one iteration, float32, no
recomputation.

Same prompts: step s of seed k trains on the prompts arca-jax draws for (k, s)
(`arca_jax.trainer.step_prompt_indices`); the TRL dataset is those prompts in step order and
its sampler does not shuffle, so both sides see the same 16 problems at every step. The same
held-out problems (the first `num_eval_problems` of the test split) give greedy accuracy
before and after training, scored by the same `Task.score_batch`.

Timing, per step (what each phase holds is spelled out in experiments/NOTES_vs_trl.md):
  arca-jax  metrics.jsonl: step_time_s, time_sample_s (prompt encoding + jitted sampler),
            time_score_s (detokenise + reward), time_update_s (jitted train step + metric read)
  TRL       a TrainerCallback from on_step_begin to on_step_end (the whole optimiser step), and
            wrappers of GRPOTrainer._generate (sample: tokenise, generate, decode),
            ._calculate_rewards (score) and ._generate_and_score_completions; update = step -
            _generate_and_score_completions (loss forward, backward, clipping, AdamW, scheduler)
  both      "other" = step - sample - score - update (advantages, batch assembly, bookkeeping)
Per run also: wall time from launch to the end of step 1, peak RSS of the process
(os.wait4's ru_maxrss), load average before and after, versions, the machine.

    python experiments/bench_vs_trl.py                      # 4 seeds x 20 steps, all arms
    python experiments/bench_vs_trl.py --seeds 0,1 --steps 10 --only trl,arca-uniform
    python experiments/bench_vs_trl.py --smoke              # 2 steps, 1 seed, 4 prompts

Needs TRL: pip install -e ".[bench]" (trl==1.16.0). Writes one JSON per run and summary.json
(the printed table with its inputs) under --out (default experiments/results/vs_trl/<time>,
--smoke: experiments/results/vs_trl/smoke); run directories go to --work-dir (a temporary
directory by default, kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ARMS = ("arca-uniform", "arca-arca", "trl")
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SKIP_STEPS = 2  # the median RL step is taken over the steps after the first two
PACKAGES = ("arca-jax", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "trl",
            "peft", "accelerate", "datasets")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS",
              "TF_CPP_MIN_LOG_LEVEL")


# --------------------------------------------------------------------------------------------
# Settings: one record, two mappings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What both sides run with (issue 19's spec); `arca_overrides` and `trl_config_kwargs`
    map it onto each side."""

    model: str = "embedded:tiny-arith"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = SEVEN_PROJECTIONS
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 80
    max_prompt_tokens: int = 64  # arca-jax's default; the arithmetic prompts are 15-29 tokens
    temperature: float = 1.0
    top_k: int = 0  # arca-jax's rollout default (off); TRL's default too
    top_p: float = 1.0  # arca-jax's rollout default (off); TRL's default too
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    steps: int = 20
    num_eval_problems: int = 200
    eval_batch_size: int = 256

    def model_dir(self) -> str:
        from arca_jax.config import ModelConfig
        return ModelConfig(path=self.model).resolved_path()


def arca_overrides(s: BenchSettings, weighting: str, seed: int) -> List[str]:
    """`arca-jax train --set` overrides for `s`. Evaluation only at the start and the end, with
    pass@1 (arca-jax always samples pass@k too; k=1 keeps that cheap), no samples log, one
    checkpoint at the end: none of these fall inside a step's time."""
    return [
        f"model.path={s.model}", "model.dtype=float32",
        f"lora.rank={s.lora_rank}", f"lora.alpha={s.lora_alpha}",
        f"lora.targets=[{','.join(s.lora_targets)}]", "lora.dropout=0.0",
        f"rollout.prompts_per_step={s.prompts_per_step}", f"rollout.group_size={s.group_size}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        f"rollout.max_prompt_tokens={s.max_prompt_tokens}",
        f"rollout.temperature={s.temperature}", f"rollout.top_k={s.top_k}",
        f"rollout.top_p={s.top_p}", "rollout.eos_token=train",
        f"optim.learning_rate={s.learning_rate}", f"optim.warmup_steps={s.warmup_steps}",
        f"optim.weight_decay={s.weight_decay}", f"optim.max_grad_norm={s.max_grad_norm}",
        f"grpo.weighting={weighting}", "grpo.kl_beta=0.0", "grpo.num_iterations=1",
        "grpo.estimator=grpo", "grpo.loss_aggregation=sequence", f"grpo.clip_eps={s.clip_eps}",
        "grpo.remat=false",
        "task.name=arithmetic", f"task.num_eval_problems={s.num_eval_problems}",
        f"train.steps={s.steps}", f"train.seed={seed}", "train.mode=jit", "train.microbatches=1",
        "train.eval_every=0", "train.pass_k=1", "train.samples_every=0", "train.save_every=0",
        f"train.eval_batch_size={s.eval_batch_size}",
    ]


def trl_config_kwargs(s: BenchSettings, seed: int, output_dir: str) -> dict:
    """`trl.GRPOConfig` keywords for `s`: one optimiser step = one generation batch of
    prompts_per_step x group_size completions, no accumulation, no shuffling (the dataset is
    already in arca-jax's step order)."""
    batch = s.prompts_per_step * s.group_size
    return dict(
        output_dir=output_dir, max_steps=s.steps, seed=seed,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=s.group_size, max_completion_length=s.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group", epsilon=s.clip_eps,
        learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False,
        shuffle_dataset=False, use_cpu=True, dataloader_num_workers=0, disable_dropout=True,
        mask_truncated_completions=False, log_completions=False, remove_unused_columns=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )


def trl_lora_kwargs(s: BenchSettings) -> dict:
    """`peft.LoraConfig` keywords for `s` (scaling alpha / r, as arca-jax)."""
    return dict(r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=list(s.lora_targets),
                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class StepTime(NamedTuple):
    """One RL step's wall time and its phases, in seconds (other = step - the three phases)."""

    step: int
    step_s: float
    sample_s: float
    score_s: float
    update_s: float
    other_s: float


class ChildResult(NamedTuple):
    """A finished child process: exit code, wall seconds, peak RSS (GB, 1e9 bytes), the seconds
    from launch at which each awaited output line appeared, and its log file."""

    returncode: int
    wall_s: float
    peak_rss_gb: float
    marks: Dict[str, float]
    log_path: str


class PromptPlan(NamedTuple):
    """The problems of one seed: per step the (prompt, solution) pairs arca-jax draws, the
    held-out pairs of the evaluation, the task's reward mode, and per step the prompt width in
    tokens (the widest prompt, the width of arca-jax's train batch before the completion)."""

    train: List[List[tuple]]
    eval: List[tuple]
    reward_mode: str
    widths: List[int]


# --------------------------------------------------------------------------------------------
# Machine, versions, child processes
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model (/proc/cpuinfo), core counts, the thread-related environment."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable,
            "platform": platform.platform(), "python": platform.python_version(),
            "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}


def versions() -> dict:
    """Package versions, and the repository's commit (with "+dirty" for uncommitted changes)."""
    from importlib import metadata

    out = {"arca_jax_commit": _git_commit()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_child(cmd: Sequence[str], log_path: str, marks: Dict[str, str],
              env: Optional[dict] = None) -> ChildResult:
    """Runs `cmd` (stdout and stderr into `log_path`), noting the seconds from launch at which
    the first line matching each `marks` pattern appears; peak RSS from os.wait4."""
    patterns = {name: re.compile(p) for name, p in marks.items()}
    seen: Dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=REPO, env=env, text=True, bufsize=1)
    with open(log_path, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            log.write(line)
            for name, pat in patterns.items():
                if name not in seen and pat.search(line):
                    seen[name] = t
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
    return ChildResult(proc.returncode, wall, usage.ru_maxrss * 1024 / 1e9, seen, log_path)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# The problems (parent process; imports arca_jax, so jax)
# --------------------------------------------------------------------------------------------


def prompt_plan(s: BenchSettings, seed: int) -> PromptPlan:
    """The prompts arca-jax trains on at each step of `seed` and its evaluation problems, read
    through arca-jax's own loaders (`arca_jax.trainer.setup`) from the run's config."""
    from transformers import AutoTokenizer

    from arca_jax import config
    from arca_jax.trainer import setup, step_prompt_indices

    cfg = config.load(None, arca_overrides(s, "uniform", seed))
    task = setup.load_train_task(cfg)
    _, eval_problems = setup.load_eval_task(cfg)
    tok = AutoTokenizer.from_pretrained(s.model_dir())
    pool = task.problems
    train, widths = [], []
    for step in range(s.steps):
        idx = step_prompt_indices(seed, step, len(pool), s.prompts_per_step)
        pairs = [(pool[i].prompt, pool[i].solution) for i in idx]
        ids = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        train.append(pairs)
        widths.append(min(s.max_prompt_tokens, max(len(x) for x in ids)))
    return PromptPlan(train, [(p.prompt, p.solution) for p in eval_problems], task.reward_mode,
                      widths)


# --------------------------------------------------------------------------------------------
# arca-jax side
# --------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_arca(s: BenchSettings, weighting: str, seed: int, work: str, plan: PromptPlan,
             extra: Sequence[str] = ()) -> dict:
    """`python -m arca_jax train` in a child process; the record of the run. `extra`: further
    `--set` overrides after the benchmark's (`--arca-set`, e.g. an option off by default)."""
    name = f"arca-{weighting}-seed{seed}"
    run_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "arca_jax", "train", "--output-dir", run_dir]
    for o in [*arca_overrides(s, weighting, seed), *extra]:
        cmd += ["--set", o]
    before = loadavg()
    res = run_child(cmd, os.path.join(work, name + ".log"),
                    {"base_eval_done": r"eval step 0:", "first_step_done": r"\bstep 1/\d+"},
                    env=child_env())
    record = {"arm": f"arca-{weighting}", "seed": seed, "command": cmd,
              "returncode": res.returncode,
              "log": res.log_path, "run_dir": run_dir, "loadavg_before": before,
              "loadavg_after": loadavg(), "wall_s": res.wall_s, "peak_rss_gb": res.peak_rss_gb,
              "launch_to_base_eval_s": res.marks.get("base_eval_done"),
              "launch_to_first_step_end_s": res.marks.get("first_step_done")}
    if res.returncode != 0:
        record["error"] = _tail(res.log_path)
        return record
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = {e["step"]: e for e in read_jsonl(os.path.join(run_dir, "eval.jsonl"))}
    steps = []
    for r in rows:
        t = StepTime(r["step"], r["step_time_s"], r["time_sample_s"], r["time_score_s"],
                     r["time_update_s"], r["step_time_s"] - r["time_sample_s"]
                     - r["time_score_s"] - r["time_update_s"])
        steps.append({**t._asdict(), "reward_mean": r["reward_mean"],
                      "completion_length": r.get("completion_length")})
    with open(os.path.join(run_dir, "summary.json")) as f:
        trainable = json.load(f).get("trainable_params")
    record.update(steps=mark_widths(steps, plan.widths),
                  greedy_accuracy_before=evals[0]["greedy_accuracy"],
                  greedy_accuracy_after=evals[max(evals)]["greedy_accuracy"],
                  num_eval_problems=evals[0]["num_problems"], trainable_params=trainable)
    return record


def mark_widths(steps: List[dict], widths: Sequence[int]) -> List[dict]:
    """Adds each step's prompt width and whether it is the first step with that width (on the
    arca-jax side the train step compiles a new program then; `PromptPlan`)."""
    seen = set()
    for st in steps:
        w = widths[st["step"] - 1]
        st.update(prompt_width=w, new_width=w not in seen)
        seen.add(w)
    return steps


def _tail(path: str, lines: int = 30) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


# --------------------------------------------------------------------------------------------
# TRL side: the parent writes a spec, the child (`--trl-child SPEC`) trains and writes a result
# --------------------------------------------------------------------------------------------


def run_trl(s: BenchSettings, seed: int, work: str, plan: PromptPlan) -> dict:
    """TRL's GRPOTrainer in a child process (this file with --trl-child); the record of the run."""
    name = f"trl-seed{seed}"
    run_dir = os.path.join(work, name)
    os.makedirs(run_dir, exist_ok=True)
    spec = {"settings": dataclasses.asdict(s), "seed": seed, "model_dir": s.model_dir(),
            "run_dir": run_dir, "train": plan.train, "eval": plan.eval,
            "reward_mode": plan.reward_mode, "result": os.path.join(run_dir, "result.json")}
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-child", spec_path]
    before = loadavg()
    res = run_child(cmd, os.path.join(work, name + ".log"),
                    {"base_eval_done": r"^BENCH eval 0 ", "first_step_done": r"^BENCH step 1 "},
                    env=child_env())
    record = {"arm": "trl", "seed": seed, "command": cmd, "returncode": res.returncode,
              "log": res.log_path, "run_dir": run_dir, "loadavg_before": before,
              "loadavg_after": loadavg(), "wall_s": res.wall_s, "peak_rss_gb": res.peak_rss_gb,
              "launch_to_base_eval_s": res.marks.get("base_eval_done"),
              "launch_to_first_step_end_s": res.marks.get("first_step_done")}
    if res.returncode != 0:
        record["error"] = _tail(res.log_path)
        return record
    with open(spec["result"]) as f:
        child = json.load(f)
    child["steps"] = mark_widths(child["steps"], plan.widths)
    record.update(child)
    return record


def trl_child(spec_path: str) -> None:
    """The TRL run: greedy evaluation of the base model, GRPOTrainer for `steps` steps with
    per-phase timing, greedy evaluation of the trained adapter; writes spec["result"]."""
    with open(spec_path) as f:
        spec = json.load(f)
    s = BenchSettings(**{**spec["settings"],
                         "lora_targets": tuple(spec["settings"]["lora_targets"])})
    seed = spec["seed"]

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from arca_jax.tasks.data import Task  # the reward arca-jax's Scorer calls (no jax import)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    task = Task(name="arithmetic", split="train", problems=(), reward_mode=spec["reward_mode"],
                prompt_template="{problem}\n")

    def score(completions, solutions) -> List[float]:
        """Task.score_batch as arca-jax's Scorer calls it; NaN/inf/non-numbers count 0."""
        res = task.score_batch(list(completions), list(solutions))
        out = []
        for r in res.rewards:
            try:
                r = float(r)
            except (TypeError, ValueError):
                r = 0.0
            out.append(r if abs(r) < float("inf") else 0.0)
        return out

    def arithmetic_reward(prompts, completions, solution, **kwargs):
        return score(completions, solution)

    eval_prompts = [p for p, _ in spec["eval"]]
    eval_solutions = [sol for _, sol in spec["eval"]]
    t = time.perf_counter()
    acc_before = greedy_accuracy(model, tok, eval_prompts, eval_solutions, score, s)
    print(f"BENCH eval 0 greedy_accuracy {acc_before:.4f} ({time.perf_counter() - t:.1f}s)",
          flush=True)

    clock = PhaseClock()

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose sampling, scoring and generate-and-score calls add to `clock`."""

        def _generate(self, prompts):
            with clock.phase("sample"):
                return super()._generate(prompts)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            with clock.phase("score"):
                return super()._calculate_rewards(inputs, prompts, completions,
                                                  completion_ids_list)

        def _generate_and_score_completions(self, inputs):
            with clock.phase("prepare"):
                return super()._generate_and_score_completions(inputs)

    steps: List[dict] = []

    class StepTimer(TrainerCallback):
        """One StepTime per optimiser step: on_step_begin .. on_step_end."""

        def on_step_begin(self, args, state, control, **kw):
            clock.reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.t0
            ph = clock.totals
            st = StepTime(state.global_step, total, ph["sample"], ph["score"],
                          total - ph["prepare"], ph["prepare"] - ph["sample"] - ph["score"])
            steps.append(st._asdict())
            print(f"BENCH step {st.step} {st.step_s:.3f}s sample {st.sample_s:.3f} score "
                  f"{st.score_s:.3f} update {st.update_s:.3f}", flush=True)

    rows = [pair for step in spec["train"] for pair in step]
    dataset = Dataset.from_dict({"prompt": [p for p, _ in rows],
                                 "solution": [sol for _, sol in rows]})
    args = GRPOConfig(**trl_config_kwargs(s, seed, os.path.join(spec["run_dir"], "trainer")))
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=args,
                               train_dataset=dataset, processing_class=tok,
                               peft_config=LoraConfig(**trl_lora_kwargs(s)),
                               callbacks=[StepTimer()])
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history
               if "completions/mean_length" in h]
    for st, r, n in zip(steps, rewards, lengths):
        st.update(reward_mean=r, completion_length=n)
    acc_after = greedy_accuracy(trainer.model, tok, eval_prompts, eval_solutions, score, s)
    print(f"BENCH eval {s.steps} greedy_accuracy {acc_after:.4f}", flush=True)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    with open(spec["result"], "w") as f:
        json.dump({"steps": steps, "greedy_accuracy_before": acc_before,
                   "greedy_accuracy_after": acc_after, "num_eval_problems": len(eval_prompts),
                   "torch_threads": torch.get_num_threads(),
                   "torch_interop_threads": torch.get_num_interop_threads(),
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "trainable_params": trainable,
                   "grpo_config": {k: v for k, v in trl_config_kwargs(s, seed, "").items()
                                   if k != "output_dir"},
                   "lora_config": trl_lora_kwargs(s)}, f, indent=1)


class PhaseClock:
    """Seconds spent in named phases since the last `reset` (nested phases both count)."""

    def __init__(self):
        self.totals: Dict[str, float] = {}
        self.reset()

    def reset(self):
        self.totals = {"sample": 0.0, "score": 0.0, "prepare": 0.0}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0


def greedy_accuracy(model, tok, prompts: Sequence[str], solutions: Sequence[str], score,
                    s: BenchSettings) -> float:
    """Mean reward of the greedy completion (max_new_tokens, stop at EOS) of each prompt, in
    chunks of eval_batch_size, prompts left-padded (as arca-jax's evaluation)."""
    import torch

    if not prompts:
        return float("nan")
    was_training = model.training
    model.eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rewards: List[float] = []
    for start in range(0, len(prompts), s.eval_batch_size):
        chunk = prompts[start:start + s.eval_batch_size]
        ids = [x[-s.max_prompt_tokens:]
               for x in tok(list(chunk), add_special_tokens=False)["input_ids"]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=s.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, top_k=None, top_p=None, temperature=None)
        texts = []
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos) + 1]
            texts.append(tok.decode(row, skip_special_tokens=True))
        rewards += score(texts, solutions[start:start + len(chunk)])
    if was_training:
        model.train()
    return sum(rewards) / len(rewards)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def timed_steps(record: dict) -> List[dict]:
    """The steps the medians read: those after the first SKIP_STEPS; a run that has no such
    step (a smoke run) falls back to its last step (flagged in the table)."""
    steps = record.get("steps", [])
    skip = min(SKIP_STEPS, max(len(steps) - 1, 0))
    return steps[skip:]


def summarize(records: List[dict], arms: Sequence[str]) -> Dict[str, dict]:
    """Per arm: pooled medians over the timed steps of every seed, per-seed medians, first step,
    peak RSS, greedy accuracy before and after (means over seeds)."""
    out = {}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm and r.get("returncode") == 0]
        if not runs:
            out[arm] = {"runs": 0}
            continue
        pooled = [st for r in runs for st in timed_steps(r)]
        no_new = [st for st in pooled if not st.get("new_width", False)]
        out[arm] = {
            "runs": len(runs), "seeds": [r["seed"] for r in runs],
            "timed_steps": len(pooled),
            "fallback_last_step": any(len(r["steps"]) <= SKIP_STEPS for r in runs),
            "median_step_s": _median([st["step_s"] for st in pooled]),
            "median_step_s_per_seed": [_median([st["step_s"] for st in timed_steps(r)])
                                       for r in runs],
            "median_step_s_without_new_width": _median([st["step_s"] for st in no_new]),
            "median_sample_s": _median([st["sample_s"] for st in pooled]),
            "median_score_s": _median([st["score_s"] for st in pooled]),
            "median_update_s": _median([st["update_s"] for st in pooled]),
            "median_other_s": _median([st["other_s"] for st in pooled]),
            "first_step_s": _median([r["steps"][0]["step_s"] for r in runs]),
            "launch_to_first_step_end_s": _median([r.get("launch_to_first_step_end_s")
                                                   for r in runs]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "greedy_accuracy_before": _mean([r["greedy_accuracy_before"] for r in runs]),
            "greedy_accuracy_after": _mean([r["greedy_accuracy_after"] for r in runs]),
            "num_eval_problems": runs[0]["num_eval_problems"],
        }
    return out


def _f(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(summary: Dict[str, dict], arms: Sequence[str], steps: int) -> str:
    """The issue's table, one column per arm, as Markdown."""
    names = {"arca-uniform": "arca-jax uniform", "arca-arca": "arca-jax ARCA", "trl": "TRL"}
    cols = [summary[a] for a in arms]

    def row(label, cell):
        return "| " + label + " | " + " | ".join(cell(c) if c.get("runs") else "failed"
                                               for c in cols) + " |"

    skip_note = (f" (median over steps after the first {SKIP_STEPS})"
                 if not any(c.get("fallback_last_step") for c in cols)
                 else " (runs too short to skip two steps: last step only)")
    lines = [
        "| | " + " | ".join(names.get(a, a) for a in arms) + " |",
        "|---|" + "---|" * len(arms),
        row("median RL step (s)" + skip_note, lambda c: _f(c["median_step_s"])),
        row("sample / score / update (s)", lambda c: " / ".join(
            _f(c[k]) for k in ("median_sample_s", "median_score_s", "median_update_s"))),
        row("other: advantages, batch assembly (s)", lambda c: _f(c["median_other_s"], 3)),
        row("first step (s) [launch to end of step 1]", lambda c: (
            f"{_f(c['first_step_s'])} [{_f(c['launch_to_first_step_end_s'], 1)}]")),
        row("peak RSS (GB)", lambda c: _f(c["peak_rss_gb"])),
        row(f"greedy accuracy after {steps} steps (before), {cols[0].get('num_eval_problems')} "
            "problems", lambda c: (f"{_f(c['greedy_accuracy_after'], 3)} "
                                   f"({_f(c['greedy_accuracy_before'], 3)})")),
        row("median RL step without a new prompt width (s)",
            lambda c: _f(c["median_step_s_without_new_width"])),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2,3)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default 20)")
    ap.add_argument("--only", default=",".join(ARMS),
                    help=f"comma-separated arms to run, of {', '.join(ARMS)}")
    ap.add_argument("--prompts", type=int, default=None,
                    help="prompts per step (default 16; --smoke 4)")
    ap.add_argument("--eval-problems", type=int, default=None,
                    help="held-out problems for greedy accuracy (default 200; --smoke 16)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script end to end: 2 steps, seed 0, 4 prompts x 8, 16 eval "
                         "problems (not a measurement)")
    ap.add_argument("--out", help="results directory (default experiments/results/vs_trl/<time>; "
                                  "--smoke: experiments/results/vs_trl/smoke)")
    ap.add_argument("--work-dir", help="run directories and logs (default: a new temporary "
                                       "directory, kept)")
    ap.add_argument("--arca-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further `--set` override of both arca-jax arms (repeatable), e.g. "
                         "rollout.shrink=2; not the benchmark's settings: recorded in the JSON")
    ap.add_argument("--trl-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--only: unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    args.arms = arms
    return args


def settings_from(args: argparse.Namespace) -> tuple:
    """(BenchSettings, seeds) from the defaults, --smoke and the explicit options."""
    s = BenchSettings()
    seeds = [0, 1, 2, 3]
    if args.smoke:
        s = dataclasses.replace(s, steps=2, prompts_per_step=4, num_eval_problems=16)
        seeds = [0]
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps)
    if args.prompts is not None:
        s = dataclasses.replace(s, prompts_per_step=args.prompts)
    if args.eval_problems is not None:
        s = dataclasses.replace(s, num_eval_problems=args.eval_problems)
    if args.seeds is not None:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    return s, seeds


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_child:
        trl_child(args.trl_child)
        return 0
    s, seeds = settings_from(args)
    out = args.out or os.path.join(REPO, "experiments", "results", "vs_trl",
                                   "smoke" if args.smoke else time.strftime("%Y%m%d-%H%M%S"))
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_vs_trl_")
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    mach, vers = machine_info(), versions()
    load0 = loadavg()
    print(f"machine: {mach['cpu_model']}, {mach['usable_cores']} usable cores, load average "
          f"{load0}; arms {args.arms}, seeds {seeds}, {s.steps} steps; runs in {work}",
          flush=True)
    if load0[0] > 0.5 * (mach["usable_cores"] or 1):
        print(f"warning: load average {load0[0]} on {mach['usable_cores']} cores: the machine is "
              "not quiet, times will not be a measurement", flush=True)
    header = {"smoke": args.smoke, "settings": dataclasses.asdict(s), "seeds": seeds,
              "arms": args.arms, "arca_set": args.arca_set, "machine": mach, "versions": vers,
              "loadavg_start": load0,
              "note": ("SMOKE RUN on a loaded machine: checks the script end to end; the times "
                       "are not a measurement") if args.smoke else None}
    records = []
    for seed in seeds:  # alternate the arms within each seed
        plan = prompt_plan(s, seed)
        for arm in args.arms:
            print(f"-- {arm} seed {seed} (load {loadavg()})", flush=True)
            t = time.perf_counter()
            rec = (run_trl(s, seed, work, plan) if arm == "trl" else
                   run_arca(s, arm.split("-", 1)[1], seed, work, plan, args.arca_set))
            rec = {"smoke": args.smoke, "note": header["note"], "settings": header["settings"],
                   "machine": mach, "versions": vers, **rec}
            with open(os.path.join(out, f"{arm}-seed{seed}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            status = "ok" if rec["returncode"] == 0 else f"FAILED (exit {rec['returncode']})"
            print(f"   {status} in {time.perf_counter() - t:.0f}s, peak RSS "
                  f"{rec['peak_rss_gb']:.2f} GB; log {rec['log']}", flush=True)
            if rec["returncode"] != 0:
                print(rec.get("error", ""), flush=True)
            records.append(rec)
    summary = summarize(records, args.arms)
    table = format_table(summary, args.arms, s.steps)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({**header, "loadavg_end": loadavg(), "summary": summary, "table": table,
                   "runs": [f"{r['arm']}-seed{r['seed']}.json" for r in records]}, f, indent=1)
    if args.smoke:
        print("SMOKE RUN (loaded machine, 2 steps, 4 prompts): not a measurement")
    print(table)
    print(f"results: {out}")
    return 0 if all(r["returncode"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
