"""The training program's configuration: one frozen dataclass per section, loaded from YAML.

    model:   which checkpoint and dtype
    lora:    `arca_jax.lora.LoraConfig` (rank, alpha, targets, dropout); on a mixture-of-experts
             checkpoint (Qwen3-30B-A3B, model_type qwen3_moe) the default targets (all seven
             projections, "every projection") adapt q_proj, k_proj, v_proj and o_proj; any
             other list is taken as written: MLP projections adapt every expert, "gate" the
             router (`trainer.setup.lora_config`)
    task:    task name, data path, evaluation set
    rollout: prompts per step, group size G, lengths, temperature, top-p, DAPO's dynamic
             sampling and overlong shaping / filtering
    grpo:    `arca_jax.grpo.GRPOConfig` (weighting, sharpening, estimator, clipping, KL, ...)
    optim:   AdamW, warmup + cosine, gradient clipping
    train:   steps, seed, parallelism, evaluation / checkpoint / logging cadence

The defaults are the embedded demo: the tiny arithmetic model shipped with the package, trained
with ARCA on CPU in a few minutes. `experiments/configs/` holds the paper's runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal, Optional

from arca_jax import configlib
from arca_jax.configlib import ConfigError
from arca_jax.lora import LoraConfig
from arca_jax.grpo.config import GRPOConfig

EMBEDDED_MODEL = "embedded:tiny-arith"
ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """path: a local Hugging Face Qwen3 directory (config.json, safetensors, tokenizer files;
    dense or mixture-of-experts, model_type qwen3 or qwen3_moe), or "embedded:tiny-arith" for the
    model shipped in arca_jax/assets/. dtype of the base weights."""

    path: str = EMBEDDED_MODEL
    dtype: Literal["float32", "bfloat16"] = "float32"

    def resolved_path(self) -> str:
        if self.path.startswith("embedded:"):
            name = self.path.split(":", 1)[1]
            return os.path.join(ASSETS, name)
        return os.path.expanduser(self.path)

    def is_hub_id(self) -> bool:
        """"org/name" that is not a local path: fetched from the Hugging Face Hub on first use."""
        return (re.fullmatch(r"[\w.-]+/[\w.-]+", self.path) is not None
                and not os.path.exists(self.resolved_path()))

    def local_dir(self) -> str:
        """The checkpoint directory, downloading a Hub id (weights, config, tokenizer) if needed."""
        if not self.is_hub_id():
            return self.resolved_path()
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(self.path, allow_patterns=[
                "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt"])
        except Exception as e:  # offline, unknown repo, no access
            raise ConfigError(f"model.path: cannot fetch {self.path!r} from the Hugging Face Hub "
                              f"({type(e).__name__}: {e}); download it elsewhere and set "
                              "model.path to the local directory") from None


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """name: "arithmetic" (embedded), "math" or "gsm8k"; path: a local JSONL file or directory
    (else the Hugging Face Hub through `datasets`). Evaluation uses the first
    `num_eval_problems` of `eval_split`.

    prompt_style: "default" (ours) or "reference" (the paper authors' prompts, math and gsm8k
    only; `arca_jax.tasks.data`). reward_mode (None: the task's default, see
    `arca_jax.tasks.load_task`): "exact", "verify" or "reference" (the authors' string match of
    the last boxed answer) for math and arithmetic; "gsm8k" or "gsm8k_final_answer" (the authors'
    "Final answer:" line; also what "reference" and the reference style select) for gsm8k."""

    name: Literal["arithmetic", "math", "gsm8k"] = "arithmetic"
    path: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    max_train_samples: Optional[int] = None
    num_eval_problems: int = 200
    reward_mode: Optional[Literal["exact", "verify", "reference", "gsm8k", "gsm8k_final_answer"]] = None
    reward_timeout_s: float = 5.0
    prompt_style: Literal["default", "reference"] = "default"

    def __post_init__(self):
        if self.num_eval_problems < 0:
            raise ValueError("num_eval_problems must be >= 0")
        if self.prompt_style == "reference" and self.name == "arithmetic":
            raise ValueError("prompt_style 'reference' is defined for math and gsm8k, not arithmetic")
        if self.reward_mode == "gsm8k_final_answer" and self.name != "gsm8k":
            raise ValueError(f"reward_mode 'gsm8k_final_answer' is for gsm8k, not {self.name!r}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """prompts_per_step P and group_size G (B = P * G completions per step); lengths in tokens.

    eos_token: whether a completion's EOS token counts in the loss, the token weights, the
    completion length T and the Gini / EffN/T diagnostics: "train" (counted), "mask" (never),
    "mask_if_pad" (not counted when the tokenizer's pad token is the EOS token, as for
    Qwen3-Base: the reference code's completion mask is tokens != pad). The EOS token stays in
    the attention mask either way.

    top_k: sample from the k most likely tokens only (after temperature, before top_p), in
    training rollouts and evaluation's pass@k samples; 0 disables it. transformers' `generate`
    applies top_k=50 when the model's generation config sets none (Qwen3-Base), so the paper
    configs set 50. top_p, then min_p (keep the tokens of probability >= min_p times the
    largest; 0: off) truncate further, as transformers' warpers (`sampling.SamplingConfig`).

    prompt_truncation: the side cut from a prompt longer than `max_prompt_tokens` (as Hugging
    Face's `truncation_side`): "left" drops its first tokens and keeps the last ones (our
    default); "right" drops its last tokens and keeps the first ones (the paper authors' code).

    DAPO (Yu et al. 2025, arXiv 2503.14476; `arca_jax.trainer.rollout`):
    dynamic_sampling: drop the groups whose G task rewards are all equal (every advantage 0) and
        top the batch up with groups of further prompts, each extra round sampling
        `prompts_per_step` more prompts of the step's seeded prompt stream; the filter reads the
        task's reward before the overlong penalty (DAPO's accuracy filter).
    max_resample_rounds: at most this many extra rounds per step; when they are spent and fewer
        than `prompts_per_step` groups have mixed rewards, the batch is filled with the earliest
        drawn all-equal groups (advantage 0: no policy gradient; verl's DAPO recipe raises an
        error here instead), so the batch shape never changes.
    overlong_buffer: L_cache of the soft overlong punishment, in tokens (0: off). With L_max =
        `max_new_tokens` and |y| the completion's tokens (EOS included, as verl counts), the
        reward gets overlong_penalty * min(0, max(-1, (L_max - L_cache - |y|) / L_cache)):
        0 up to L_max - L_cache tokens, falling linearly to -overlong_penalty at L_max.
    overlong_penalty: the punishment's scale (DAPO: 1.0).
    overlong_filtering: completions cut at `max_new_tokens` without EOS are kept out of the loss
        (completion_mask 0; they still count in their group's advantages).

    max_batch: completions decoded at once in a training rollout (None: all P * G). Fewer slots
        than completions: a completion that ends hands its slot to the next waiting one
        (continuous refill, `sampling.generate(max_batch=...)`), bounding the KV cache to
        max_batch rows; rounded up to whole groups. The completions are the same either way.
    shrink: halvings of the decode slots as completions end, in rollouts and evaluation
        (`sampling.generate(shrink=...)`; 0: none; None: `sampling.CPU_SHRINK` = 2 on CPU, 0
        on GPU and TPU): once no completion waits and at most half the slots still run, the
        running ones go on in half as many slots, so completions that ended early stop costing
        decode steps. The completions are the same either way; each halving compiles one more
        decode loop into the decode program and, while it gathers the running rows, holds the
        cache and its half-size copy (1.5x the cache; `arca-jax plan` compiles the decode loop
        without halvings). On CPU, 2 halvings cut the demo's decode loop from 648 to 429 ms
        (`experiments/NOTES_sampling.md`).
    replicas: devices sampling at once without a mesh (modes "jit" and "pmap"), each decoding
        its own share of the prompt groups in its own loop (`arca_jax.replicas`; None: on CPU
        two per core, which `arca-jax train` / `eval` / `sweep` give JAX as CPU devices, but
        none with fewer than `replicas.MIN_SLOTS` = 16 slots; 1 elsewhere). The completions are
        the same either way; each device holds a copy of the sampling weights. On a 2-core CPU
        the demo's rollout samples 1.6x faster with 2 than with 1, and 1.2x faster again with 4
        (`experiments/NOTES_sampling.md`, "One sampler per core", "Two per core").
    gather_weights: on a mesh with "fsdp" > 1, rollouts and evaluation gather the sampling
        weights over "fsdp" once per generation, so that decode steps read each device's
        "tensor" shard of the whole model in place instead of combining the kernels' "fsdp"
        parts at every step (`parallel.gather_weights`, `sampling.generate(gather_weights=...)`).
        None: when the gathered weights per device take at most a quarter of the device's
        published memory (TPU, H100, H200; never on CPU). The completions are the same either
        way; gathered, the sampler holds weight bytes / tensor per device while it runs.
    mesh_fsdp, mesh_tensor: with `train.mode: mesh`, rollouts and evaluation sample on a mesh
        of their own over the same devices: (data, mesh_fsdp, mesh_tensor), data the rest
        (`parallel.reshape_mesh`). None for both: the train mesh; one of them set: the other 1.
        A decode step reads every weight for a handful of rows, so sampling wants the weights
        split over "tensor" (each device reads 1 / tensor of them per step) where the update
        wants them over "fsdp" (no per-layer all-reduce of its many tokens). The sampler's weight
        preparation reshards the base weights and the adapter from the train layout in the same
        program, and the completions return to the train step's rows (the same tokens either
        way). E.g. `mesh_tensor: 4` on a 4-chip TPU v5e with the update on fsdp 4 (Qwen3-1.7B,
        the paper's config): `arca-jax plan` gives a rollout roofline of 1.37 s against 3.36 s
        on the train mesh (README, "Mesh shapes").
    merge_lora: rollouts and evaluation sample from the merged weights W + scaling * A B (one
        matmul per projection; `sampling.generate(merge_lora=True)`) instead of the base weights
        and the adapter's low-rank side path. None: merged on CPU with float32 weights, where the
        merge is exact up to float rounding and saves the side path's small matmuls; low-rank
        elsewhere (merged bfloat16 weights would round the adapter's small update away, and a
        merged copy of a sharded model costs its weights' memory again).
    """

    # deliberate: a field list (resembles other config dataclasses by shape only)
    prompts_per_step: int = 16
    group_size: int = 8
    max_prompt_tokens: int = 64
    max_new_tokens: int = 80
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    eos_token: Literal["train", "mask", "mask_if_pad"] = "train"
    prompt_truncation: Literal["left", "right"] = "left"
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    overlong_filtering: bool = False
    max_batch: Optional[int] = None
    shrink: Optional[int] = None
    replicas: Optional[int] = None
    gather_weights: Optional[bool] = None
    mesh_fsdp: Optional[int] = None
    mesh_tensor: Optional[int] = None
    merge_lora: Optional[bool] = None

    def __post_init__(self):
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.max_prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("max_prompt_tokens and max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p}")
        if self.max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds must be >= 0, got {self.max_resample_rounds}")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic_sampling needs group_size >= 2 (a group of one always has "
                             "equal rewards)")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [0, max_new_tokens="
                             f"{self.max_new_tokens}], got {self.overlong_buffer}")
        if not self.overlong_penalty >= 0:
            raise ValueError(f"overlong_penalty must be >= 0, got {self.overlong_penalty}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {self.max_batch}")
        if self.shrink is not None and (isinstance(self.shrink, bool) or self.shrink < 0):
            raise ValueError(f"shrink must be >= 0 (halvings of the decode slots) or None, "
                             f"got {self.shrink}")
        for name in ("mesh_fsdp", "mesh_tensor"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be >= 1 or None (the train mesh's), got {v}")
        if self.replicas is not None and (isinstance(self.replicas, bool) or self.replicas < 1):
            raise ValueError(f"replicas must be >= 1 (devices sampling at once) or None, "
                             f"got {self.replicas}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to 0 over `train.steps`; global-norm clipping."""

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """steps: GRPO steps (each samples a fresh batch); microbatches: gradient accumulation;
    mode: "jit" (one device), "pmap" or "mesh" (all devices; mesh_fsdp shards base weights,
    mesh_tensor splits every layer's heads and MLP units, tensor parallelism; the rest of the
    devices is "data");
    eval_every / save_every / samples_every: in steps (0 = only at the start and end);
    pass_k: k of pass@k at evaluation (None: the group size); pack: the train step's forwards
    run on the batch's real tokens only, rows packed into fewer lines (`arca_jax.packing`; same
    results up to float rounding; line counts in quarters of the batch, so at most four compiled
    steps; mode "jit" with microbatches 1, else rows stay padded); share_prompts: with pack,
    the completions of a group packed into one line share one copy of their prompt, so the
    forwards run each prompt once per line instead of once per completion (same results up to
    float rounding; lines of line_width T slots; dense models without LoRA dropout only: a
    mixture of experts would count the shared tokens once in its routing statistics, and
    dropout would draw one mask for the rows sharing them; None: on when the step runs on CPU,
    where it was measured faster, off on GPU and TPU, where its wider lines multiply the einsum
    attention's scores per line and it has not been measured yet); line_width: with
    share_prompts, each packed line holds line_width T slots (T: the batch's width), so that a
    group's prompt and completions fit one line with one prompt copy (None: 4 when the train
    step's attention resolves to the CPU kernel, whose work follows the (query, key) pairs a
    token sees, not the line's slots; 2 with the einsum attention, whose scores grow with the
    square of the line); prepare_ahead: with pack,
    prepare in a background thread the packed step's program for the next line count up when a
    batch nearly fills its own, before a step needs it (`trainer.programs`; None: on when the
    step runs on a GPU or TPU, whose host cores idle meanwhile, off on CPU, where they run the
    step); store_programs: keep the packed train step's and the sampler's compiled programs on
    disk, keyed by what they are built from and the source, so that a new run of the same
    config loads them without tracing (`trainer.executables`; None: on for a CPU run of one
    process in mode "jit" with the compilation cache on, the train step's only with
    prepare_ahead off and a weighting of this package; off elsewhere);
    eval_batch_size: problems whose completions decode at once in an evaluation (its KV cache
    holds eval_batch_size x pass_k rows; the problems beyond wait for a free slot: continuous
    refill)."""

    steps: int = 60
    seed: int = 0
    microbatches: int = 1
    mode: Literal["jit", "pmap", "mesh"] = "jit"
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    eval_every: int = 0
    pass_k: Optional[int] = None
    save_every: int = 20
    keep_checkpoints: int = 2
    samples_every: int = 10
    samples_per_log: int = 2
    eval_batch_size: int = 256
    pack: bool = True
    share_prompts: Optional[bool] = None
    line_width: Optional[int] = None
    prepare_ahead: Optional[bool] = None
    store_programs: Optional[bool] = None

    def __post_init__(self):
        if self.store_programs and self.prepare_ahead:
            raise ValueError("train.store_programs and train.prepare_ahead exclude each other "
                             "(a stored step is loaded, not prepared): set one of them")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("microbatches", "keep_checkpoints", "eval_batch_size", "mesh_fsdp",
                     "mesh_tensor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "samples_every", "samples_per_log"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pass_k is not None and self.pass_k < 1:
            raise ValueError(f"pass_k must be >= 1, got {self.pass_k}")
        if self.line_width is not None and (isinstance(self.line_width, bool)
                                            or not isinstance(self.line_width, int)
                                            or self.line_width < 1):
            raise ValueError(f"line_width must be None or an int >= 1, got {self.line_width!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig(rank=8, alpha=16.0)
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig(weighting="arca")
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        if self.grpo.estimator != "dr_grpo" and self.rollout.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 for the {self.grpo.estimator!r} "
                             f"estimator, got {self.rollout.group_size}")

    @property
    def batch_size(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size


def load(path: Optional[str] = None, overrides=()) -> RunConfig:
    """The run config from YAML `path` (None: the defaults) with `key=value` overrides."""
    return configlib.load(RunConfig, path, overrides)


def check_environment(cfg: RunConfig, num_devices: int) -> None:
    """Checks what depends on the machine: paths exist, the batch splits over the devices."""
    model_dir = cfg.model.resolved_path()
    if not cfg.model.is_hub_id() and not os.path.isdir(model_dir):
        raise ConfigError(f"model.path: {model_dir} does not exist")
    if cfg.task.path is not None and not os.path.exists(os.path.expanduser(cfg.task.path)):
        raise ConfigError(f"task.path: {cfg.task.path} does not exist")
    rows = cfg.batch_size
    if rows % cfg.train.microbatches:
        raise ConfigError(f"the batch of {rows} completions (prompts_per_step x group_size) is not "
                          f"divisible by train.microbatches={cfg.train.microbatches}")
    if cfg.train.mode == "mesh" and num_devices % (cfg.train.mesh_fsdp * cfg.train.mesh_tensor):
        raise ConfigError(f"train.mesh_fsdp={cfg.train.mesh_fsdp} x train.mesh_tensor="
                          f"{cfg.train.mesh_tensor} does not divide the device count {num_devices}")
    r = cfg.rollout
    if r.mesh_fsdp is not None or r.mesh_tensor is not None:
        if cfg.train.mode != "mesh":
            raise ConfigError("rollout.mesh_fsdp / rollout.mesh_tensor lay out a mesh's devices "
                              f"for sampling; train.mode is {cfg.train.mode!r}, not 'mesh'")
        if num_devices % ((r.mesh_fsdp or 1) * (r.mesh_tensor or 1)):
            raise ConfigError(f"rollout.mesh_fsdp={r.mesh_fsdp or 1} x rollout.mesh_tensor="
                              f"{r.mesh_tensor or 1} does not divide the device count "
                              f"{num_devices}")
    # devices holding different rows (a tensor group shares its rows)
    row_devices = num_devices // (cfg.train.mesh_tensor if cfg.train.mode == "mesh" else 1)
    if cfg.train.mode != "jit" and (rows // cfg.train.microbatches) % row_devices:
        per = "" if row_devices == num_devices else (
            f" over train.mesh_tensor={cfg.train.mesh_tensor}, i.e. {row_devices} row groups")
        raise ConfigError(f"each microbatch of {rows // cfg.train.microbatches} completions must "
                          f"be divisible by the device count ({num_devices}){per} in mode "
                          f"{cfg.train.mode!r}")
