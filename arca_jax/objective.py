"""The GRPO objective with token-level credit assignment (ARCA and the paper's other weightings).

Dimension letters as in ``arca_jax.qwen3``: B batch (trajectories), T time, D model width,
P prompts, G completions per prompt (B = P * G).

Per completion token t of trajectory b (token y_bt = input_ids[b, t], scored by the logits at
t - 1) the objective uses

    ratio_bt = exp(logp_bt - old_logp_bt)
    pg_bt    = -min(ratio_bt A_b, clip(ratio_bt, 1 - clip_eps, 1 + clip_eps_high) A_b)
               (with batch.old_logps; without them the ratio is exactly 1, nothing is clipped,
               and pg_bt = -A_b logp_bt: the paper's loss value, the surrogate's gradient)
    kl_bt    = exp(ref_bt - logp_bt) - (ref_bt - logp_bt) - 1        (k3, ref = adapter off)
    w_bt     = stop_gradient(token_weights(weighting, ...))          (sum_t w_bt = 1 per row)

and aggregates them with ``loss_aggregation`` (n_b = completion tokens of row b):

    "sequence"   (paper): loss = sum_b [sum_t w_bt pg_bt + kl_beta/n_b sum_t kl_bt] / #rows
    "token_mean" (DAPO) : loss = sum_b [sum_t n_b w_bt pg_bt + kl_beta sum_t kl_bt] / sum_b n_b
    "dr_grpo"           : loss = sum_b [sum_t n_b w_bt pg_bt + kl_beta sum_t kl_bt] / (#rows * L)

#rows counts rows with at least one completion token; L is ``max_completion_length`` (default:
the batch's T). With uniform weights n_b w_bt = 1, so the last two are exactly DAPO's token mean
and Dr. GRPO's constant normaliser; a non-uniform weighting redistributes a row's token mass
without changing its total. The KL term is a regulariser, not credit: it is always averaged
uniformly over a row's tokens. With the defaults (no old_logps, kl_beta = 0, "sequence") the loss
is -mean_b A_b sum_t w_bt log pi(y_bt), the paper's.

The forwards: one gradient forward with the adapter (LoRA dropout there only), and, only when
some term needs it, one shared base forward (lora=None, stop_gradient) that serves ARCA's
h_base, divergence's reference log-probs and the KL term together. ``forwards_needed`` says
which run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from arca_jax import credit, qwen3
from arca_jax.logprobs import shift_right, token_logprobs

Array = jax.Array

ESTIMATORS = ("grpo", "rloo", "dr_grpo")
AGGREGATIONS = ("sequence", "token_mean", "dr_grpo")


# --------------------------------------------------------------------------------------------
# Config and batch
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Objective settings. Frozen and hashable: static under jit.

    weighting: token credit, one of ``credit.MODES`` ("uniform", "surprisal",
        "entropy_reduction", "divergence", "arca").
    sharpening: exponent s on (alpha + eps) before normalising (paper's sweep: 2.0).
    eps: added to every salience (``credit.token_weights``).
    estimator: advantage estimator the trainer uses with ``advantages`` ("grpo", "rloo",
        "dr_grpo"); the loss itself reads precomputed advantages from the batch.
    kl_beta: weight of the k3 KL penalty against the base model (adapter off); 0 disables it.
    clip_eps, clip_eps_high: PPO ratio clip range [1 - clip_eps, 1 + clip_eps_high]
        (clip_eps_high None: symmetric).
    num_iterations: optimiser steps per generated batch; > 1 requires ``old_logps`` in the batch.
    loss_aggregation: "sequence" (paper), "token_mean" (DAPO) or "dr_grpo" (see module doc).
    max_completion_length: L of the "dr_grpo" normaliser; None uses the batch's T.
    logits_chunk: positions per chunk of the vocabulary projection (``logprobs.token_logprobs``).
        Chunks are laid on the token grid (chunk j scores tokens [jC, (j+1)C)), so a completion
        that starts at a multiple of C (e.g. the sampler's power-of-two prompt widths) leaves
        no partly used chunk.
    remat: rematerialise each decoder layer in the backward pass of the gradient forward: False,
        True (= "full": keep only each layer's input) or "projections" (also keep every
        projection's output, so no matmul runs twice; see ``qwen3.remat_policy``).
    attention: attention implementation of both forwards (``qwen3.resolve_attention``): "auto"
        (cuDNN flash attention on a CUDA GPU with bf16 activations, else "einsum"), "einsum",
        "cudnn", "sdpa-xla". The fused ones need each row's attention_mask to be one run of ones.
    lora_dtype: dtype of the adapter matmuls (``qwen3.LoraLinear``); None: the activation dtype
        (bf16 under a bf16 base; float32 models unchanged); "float32" forces float32.
    logits_grad_dtype: dtype of the backward matmul through the vocabulary projection
        (``logprobs.token_logprobs`` grad_dtype); None: the hidden states' dtype; "float32"
        keeps the float32 cotangent.
    noise_floor: relative rounding-noise floor of the two forwards' comparison: an ARCA residual
        ||h_adapted - h_base|| <= noise_floor * ||h_base|| and a divergence
        |log pi - log pi_ref| <= noise_floor * max(1, |log pi_ref|) count as 0. The gradient
        forward and the base forward compute the same function with different XLA fusions, so
        with a zero adapter they differ by float32 rounding (~1e-7 relative), which would
        otherwise decide the weights; with the floor a fresh adapter (B = 0) gives exactly
        uniform weights, as in the reference. 1e-5 is far below any adapter effect the weights
        should resolve (bfloat16 hidden states are quantised at ~4e-3 relative anyway).
        0 disables it.
    """

    weighting: str = "arca"
    sharpening: float = 1.0
    eps: float = 1e-8
    estimator: str = "grpo"
    kl_beta: float = 0.0
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    num_iterations: int = 1
    loss_aggregation: str = "sequence"
    max_completion_length: Optional[int] = None
    logits_chunk: int = 128
    remat: Union[bool, str] = False
    noise_floor: float = 1e-5
    attention: str = "auto"
    lora_dtype: Optional[str] = None
    logits_grad_dtype: Optional[str] = None

    def __post_init__(self):
        if self.weighting not in credit.MODES:
            raise ValueError(f"weighting {self.weighting!r}; valid: {', '.join(credit.MODES)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation {self.loss_aggregation!r}; valid: "
                             f"{', '.join(AGGREGATIONS)}")
        if not self.sharpening > 0:
            raise ValueError(f"sharpening must be > 0, got {self.sharpening}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if not self.clip_eps > 0 or (self.clip_eps_high is not None and not self.clip_eps_high > 0):
            raise ValueError("clip_eps and clip_eps_high must be > 0")
        if not (isinstance(self.num_iterations, int) and self.num_iterations >= 1):
            raise ValueError(f"num_iterations must be an int >= 1, got {self.num_iterations!r}")
        if self.max_completion_length is not None and not self.max_completion_length >= 1:
            raise ValueError("max_completion_length must be >= 1")
        if not self.noise_floor >= 0:
            raise ValueError(f"noise_floor must be >= 0, got {self.noise_floor}")
        if not (isinstance(self.logits_chunk, int) and self.logits_chunk >= 1):
            raise ValueError(f"logits_chunk must be an int >= 1, got {self.logits_chunk!r}")
        qwen3.remat_policy(self.remat)  # raises ValueError for an unknown option
        if self.attention not in qwen3.ATTENTION_IMPLS:
            raise ValueError(f"attention {self.attention!r}; valid: "
                             f"{', '.join(qwen3.ATTENTION_IMPLS)}")
        for name in ("lora_dtype", "logits_grad_dtype"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be None or a dtype name, got {v!r}")
            if v is not None:
                jnp.dtype(v)  # raises TypeError for an unknown dtype name

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@struct.dataclass
class Batch:
    """One batch of B trajectories of T tokens (prompt and completion in one sequence).

    input_ids: [B, T] int32 tokens (prompts left-padded, completions right-padded).
    attention_mask: [B, T] 1 for real tokens, 0 for padding.
    completion_mask: [B, T] 1 where that token was generated and counts (aligned with
        input_ids; its log-prob comes from the logits at t - 1, so column 0 never counts).
    advantages: [B] float32, one scalar per trajectory (see ``advantages``).
    positions: [B, T] int32 rotary positions, or None for cumsum(attention_mask) - 1.
    old_logps: [B, T] float32 log-probs of the tokens under the sampling policy, aligned with
        input_ids (see ``policy_logprobs``), or None: then the PPO ratio is exactly 1.

    Indexable like the issue's dict (``batch["input_ids"]``); ``as_batch`` accepts a dict.
    """

    input_ids: Array
    attention_mask: Array
    completion_mask: Array
    advantages: Array
    positions: Optional[Array] = None
    old_logps: Optional[Array] = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def as_batch(batch: Union[Batch, Mapping[str, Any]]) -> Batch:
    """A ``Batch`` from a ``Batch`` or a mapping with its field names (unknown keys rejected)."""
    if isinstance(batch, Batch):
        return batch
    names = {f.name for f in dataclasses.fields(Batch)}
    extra = set(batch) - names
    if extra:
        raise ValueError(f"unknown batch keys {sorted(extra)}; expected {sorted(names)}")
    return Batch(**dict(batch))


def forwards_needed(grpo_config: GRPOConfig) -> Tuple[str, ...]:
    """Model forwards one loss evaluation runs: ("policy",) or ("policy", "base").

    The base forward (adapter off) runs only for ARCA (h_base), divergence (reference
    log-probs) or kl_beta > 0 (reference log-probs), and once for all of them."""
    need_base = grpo_config.weighting in ("arca", "divergence") or grpo_config.kl_beta > 0
    return ("policy", "base") if need_base else ("policy",)


# --------------------------------------------------------------------------------------------
# Advantages and per-token terms
# --------------------------------------------------------------------------------------------


def advantages(rewards: Array, estimator: str = "grpo", *, eps: float = 1e-6) -> Array:
    """Group-relative advantages.

    rewards: [P, G] one row per prompt, G completions each.
    estimator: "grpo": (r - mean) / max(std, eps), std unbiased (ddof = 1);
               "rloo": r - mean of the other G - 1 rewards of the group;
               "dr_grpo": r - mean.
    eps: floor of the std ("grpo" only). A group of identical rewards gets advantages 0.
    Returns: [P, G] float32 (flatten prompt-major, ``.reshape(-1)``, for ``Batch.advantages``).
    With G = 1 every estimator returns 0 (no baseline can be formed from the group).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [P, G], got shape {r.shape}")
    G = r.shape[1]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if G == 1:
        return jnp.zeros_like(r)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.std(r, axis=1, ddof=1, keepdims=True)
        return (r - mean) / jnp.maximum(std, eps)
    if estimator == "rloo":
        return (r - mean) * (G / (G - 1))  # = r - (sum - r) / (G - 1)
    return r - mean


def clipped_policy_loss(logps: Array, old_logps: Array, adv: Array, clip_low: float,
                        clip_high: float) -> Tuple[Array, Array, Array]:
    """PPO clipped surrogate per token.

    logps, old_logps: [B, T]; adv: [B, T] (broadcast advantages).
    Returns (loss [B, T] = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),
             ratio [B, T], clipped [B, T] bool: the clipped branch is active, i.e. the token
             contributes no gradient: r > 1 + clip_high with A > 0 or r < 1 - clip_low with A < 0).
    """
    ratio = jnp.exp(logps - old_logps)
    unclipped = ratio * adv
    clipped_val = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -jnp.where(unclipped <= clipped_val, unclipped, clipped_val)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return loss, ratio, clipped


def k3_kl(logps: Array, ref_logps: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@struct.dataclass
class LossStats:
    """Additive statistics of one loss evaluation (sums and counts, so that microbatches and
    devices combine exactly: add them, take the max of ``residual_norm_max``).

    rows: rows with >= 1 completion token. tokens: completion tokens. The ``*_sum`` fields are
    sums over completion tokens (``gini_sum``/``eff_sum`` over rows, with their own counts).
    ``metrics`` turns them into means.
    """

    rows: Array
    tokens: Array
    pg_sum: Array
    kl_sum: Array
    clip_count: Array
    entropy_sum: Array
    gini_sum: Array
    gini_rows: Array
    eff_sum: Array
    eff_rows: Array
    residual_sum: Array
    residual_norm_max: Array

    def combine(self, other: "LossStats") -> "LossStats":
        return jax.tree_util.tree_map(jnp.add, self, other).replace(
            residual_norm_max=jnp.maximum(self.residual_norm_max, other.residual_norm_max))

    def all_reduce(self, axis_name: str) -> "LossStats":
        """Sums (max for residual_norm_max) over a pmap/shard_map axis."""
        summed = jax.lax.psum(self, axis_name)
        return summed.replace(residual_norm_max=jax.lax.pmax(self.residual_norm_max, axis_name))

    def metrics(self) -> dict:
        """Means: mean per-token KL, clip fraction, entropy (nats) and residual norm; mean Gini
        and EffN/T over eligible rows (0 and 1 when none); mean completion length per row."""
        tok = jnp.maximum(self.tokens, 1.0)
        return dict(
            kl=self.kl_sum / tok,
            clip_fraction=self.clip_count / tok,
            entropy=self.entropy_sum / tok,
            weight_gini=self.gini_sum / jnp.maximum(self.gini_rows, 1.0),
            effective_token_ratio=jnp.where(self.eff_rows > 0,
                                            self.eff_sum / jnp.maximum(self.eff_rows, 1.0), 1.0),
            residual_norm_mean=self.residual_sum / tok,
            residual_norm_max=self.residual_norm_max,
            completion_length=self.tokens / jnp.maximum(self.rows, 1.0),
        )


def completion_valid(batch: Batch) -> Array:
    """[B, T] bool: tokens that count (completion_mask, attention_mask, and t >= 1)."""
    cm = batch.completion_mask != 0
    if batch.attention_mask is not None:
        cm = cm & (batch.attention_mask != 0)
    return cm & (jnp.arange(cm.shape[1]) >= 1)[None, :]


def raw_normalizer(valid: Array, grpo_config: GRPOConfig) -> Array:
    """Un-clamped aggregation denominator of [B, T] ``valid`` completion tokens: #rows with a
    completion token ("sequence"), #completion tokens ("token_mean") or #rows * L ("dr_grpo";
    every row of the batch counts). Additive over shards and microbatches."""
    agg = grpo_config.loss_aggregation
    if agg == "sequence":
        return jnp.sum(jnp.any(valid, axis=1)).astype(jnp.float32)
    if agg == "token_mean":
        return jnp.sum(valid).astype(jnp.float32)
    L = grpo_config.max_completion_length or valid.shape[1]
    return jnp.asarray(valid.shape[0] * L, jnp.float32)


def loss_normalizer(batch: Union[Batch, Mapping[str, Any]], grpo_config: GRPOConfig) -> Array:
    """The aggregation's denominator for this batch ([] float32, clamped to >= 1; see
    ``raw_normalizer``). The train step computes it on the whole (global) batch and hands it to
    every microbatch and device."""
    return jnp.maximum(raw_normalizer(completion_valid(as_batch(batch)), grpo_config), 1.0)


def _run_forward(params, b: Batch, *, config, lora, lora_scale, grpo_config: GRPOConfig,
                 lora_dropout=0.0, rng=None, remat=False) -> Array:
    g = grpo_config
    return qwen3.forward(params, b.input_ids, config=config, attention_mask=b.attention_mask,
                         positions=b.positions, lora=lora, lora_scale=lora_scale,
                         lora_dropout=lora_dropout, rng=rng, return_logits=False,
                         remat=remat, attention=g.attention, lora_dtype=g.lora_dtype).hidden


def _aligned_logprobs(params, h, b: Batch, valid, *, config, grpo_config: GRPOConfig,
                      with_entropy: bool):
    """Log-probs and entropies of input_ids, aligned with them, 0 where not ``valid``. Token t is
    scored by the hidden state at t - 1, so the chunks run over shift_right(h) on the token grid:
    a completion that starts at a multiple of the chunk size fills whole chunks (scoring
    positions t - 1 would straddle one more chunk). Values as ``token_logprobs`` on h."""
    lp, ent = token_logprobs(params, shift_right(h), b.input_ids, config=config,
                             chunk_size=grpo_config.logits_chunk, valid=valid,
                             with_entropy=with_entropy, grad_dtype=grpo_config.logits_grad_dtype)
    return jnp.where(valid, lp, 0.0), jnp.where(valid, ent, 0.0)


def residual_norms(h: Array, h_base: Array, valid: Array, noise_floor: float) -> Array:
    """ARCA saliences [B, T] aligned with input_ids: ||h - h_base||_2 at the position whose
    logits score each token (t - 1), 0 where not ``valid``. Below ``noise_floor * ||h_base||``
    the two forwards differ only by float rounding (different fusions of the same math), so a
    zero adapter gives exactly 0, hence uniform weights."""
    hb32 = h_base.astype(jnp.float32)
    diff = h.astype(jnp.float32) - hb32
    rn = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # [B, T] at the scoring position
    floor = noise_floor * jnp.sqrt(jnp.sum(hb32 * hb32, axis=-1))
    rn = jnp.where(rn > floor, rn, 0.0)
    return jnp.where(valid, shift_right(rn), 0.0)


def floored_reference(logps: Array, ref_logps: Array, noise_floor: float) -> Array:
    """Reference log-probs for the divergence salience with the same noise floor: where
    |log pi - log pi_ref| <= noise_floor * max(1, |log pi_ref|) the reference is taken equal to
    log pi (divergence 0)."""
    close = jnp.abs(logps - ref_logps) <= noise_floor * jnp.maximum(1.0, jnp.abs(ref_logps))
    return jnp.where(close, logps, ref_logps)


def policy_logprobs(lora, params, batch: Union[Batch, Mapping[str, Any]], *,
                    config: qwen3.Qwen3Config, lora_scale: float,
                    grpo_config: GRPOConfig = GRPOConfig()) -> Array:
    """[B, T] float32 log-probs of input_ids under the adapted policy (no dropout), aligned with
    input_ids (0 at invalid positions): the ``old_logps`` for num_iterations > 1."""
    b = as_batch(batch)
    valid = completion_valid(b)
    h = _run_forward(params, b, config=config, lora=lora, lora_scale=lora_scale,
                     grpo_config=grpo_config)
    lp, _ = _aligned_logprobs(params, h, b, valid, config=config, grpo_config=grpo_config,
                              with_entropy=False)
    return lp


def loss_fn(lora, params, batch: Union[Batch, Mapping[str, Any]], *, config: qwen3.Qwen3Config,
            lora_scale: float, grpo_config: GRPOConfig, lora_dropout: float = 0.0,
            rng: Optional[Array] = None, normalizer: Optional[Array] = None
            ) -> Tuple[Array, LossStats]:
    """The GRPO loss of one batch (see the module doc) and its statistics.

    lora: adapter tree (``arca_jax.lora``), the argument to differentiate.
    params: frozen base parameters.
    batch: ``Batch`` (or a dict with its fields); old_logps required when num_iterations > 1.
    config: model config (static). lora_scale: adapter scaling (static Python float).
    grpo_config: ``GRPOConfig`` (static).
    lora_dropout: dropout rate on the adapter input, gradient forward only; needs ``rng``.
    rng: dropout key (the train step passes fold_in(state.rng, state.step)).
    normalizer: the aggregation's denominator; None computes it from this batch
        (``loss_normalizer``). The train step passes the global batch's value so that
        microbatches and devices add up to the large-batch loss.

    Returns: (loss [] float32, ``LossStats``).
    """
    g = grpo_config
    b = as_batch(batch)
    if g.num_iterations > 1 and b.old_logps is None:
        raise ValueError("num_iterations > 1 needs batch.old_logps (see policy_logprobs)")
    B, T = b.input_ids.shape
    valid = completion_valid(b)  # [B, T] aligned with input_ids
    validf = valid.astype(jnp.float32)

    # Gradient forward (adapter on, dropout here only). Token t is scored at position t - 1.
    h = _run_forward(params, b, config=config, lora=lora, lora_scale=lora_scale, grpo_config=g,
                     lora_dropout=lora_dropout, rng=rng, remat=g.remat)  # [B, T, D]
    logps, entropies = _aligned_logprobs(params, h, b, valid, config=config, grpo_config=g,
                                         with_entropy=True)  # [B, T]; entropies detached

    # Shared base forward (adapter off), only when something reads it.
    ref_logps = residual = None
    if "base" in forwards_needed(g):
        h_base = jax.lax.stop_gradient(_run_forward(params, b, config=config, lora=None,
                                                    lora_scale=lora_scale, grpo_config=g))
        if g.weighting == "divergence" or g.kl_beta > 0:
            ref, _ = _aligned_logprobs(params, h_base, b, valid, config=config, grpo_config=g,
                                       with_entropy=False)
            ref_logps = jax.lax.stop_gradient(ref)
        if g.weighting == "arca":
            residual = residual_norms(jax.lax.stop_gradient(h), h_base, valid, g.noise_floor)

    sg_logps = jax.lax.stop_gradient(logps)
    div_ref = ref_logps
    if g.weighting == "divergence":
        div_ref = floored_reference(sg_logps, ref_logps, g.noise_floor)
    weights = jax.lax.stop_gradient(credit.token_weights(
        g.weighting, valid, logps=sg_logps, ref_logps=div_ref, entropies=entropies,
        residual_norms=residual, eps=g.eps, sharpening=g.sharpening))  # [B, T]

    adv = jnp.broadcast_to(b.advantages.astype(jnp.float32)[:, None], (B, T))
    if b.old_logps is None:
        # On-policy: the ratio is exactly 1 and never clipped. The paper's form -A log pi has the
        # PPO surrogate's gradient at ratio 1 (d ratio = d log pi) and the paper's loss value.
        pg = -adv * logps
        clipped = jnp.zeros((B, T), bool)
    else:
        old = jnp.where(valid, b.old_logps.astype(jnp.float32), sg_logps)  # padding: ratio 1
        pg, _, clipped = clipped_policy_loss(logps, old, adv, g.clip_eps, g.clip_high)
    pg = jnp.where(valid, pg, 0.0)

    n = jnp.sum(validf, axis=1, keepdims=True)  # [B, 1]
    if g.loss_aggregation == "sequence":
        coef = weights
        kl_coef = validf / jnp.maximum(n, 1.0)
    else:
        coef = weights * n
        kl_coef = validf
    numerator = jnp.sum(coef * pg)
    kl = jnp.zeros_like(logps)
    if ref_logps is not None:
        kl = jnp.where(valid, k3_kl(logps, ref_logps), 0.0)
        if g.kl_beta > 0:
            numerator = numerator + g.kl_beta * jnp.sum(kl_coef * kl)
    z = loss_normalizer(b, g) if normalizer is None else normalizer
    loss = numerator / z

    rows = credit.concentration_per_row(weights, valid)
    res = jnp.zeros_like(logps) if residual is None else residual
    stats = LossStats(
        rows=jnp.sum(jnp.any(valid, axis=1)).astype(jnp.float32),
        tokens=jnp.sum(validf),
        pg_sum=jax.lax.stop_gradient(jnp.sum(pg)),
        kl_sum=jax.lax.stop_gradient(jnp.sum(kl)),
        clip_count=jnp.sum(clipped & valid).astype(jnp.float32),
        entropy_sum=jnp.sum(entropies),
        gini_sum=jnp.sum(rows.gini),
        gini_rows=jnp.sum(rows.gini_valid).astype(jnp.float32),
        eff_sum=jnp.sum(rows.effective_token_ratio),
        eff_rows=jnp.sum(rows.effective_token_ratio_valid).astype(jnp.float32),
        residual_sum=jnp.sum(res),
        residual_norm_max=jnp.max(res),
    )
    return loss, stats
