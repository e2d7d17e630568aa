"""The GRPO objective with token-level credit assignment (ARCA and the paper's other weightings).

Dimension letters as in ``arca_jax.qwen3``: B batch (trajectories), T time, D model width,
P prompts, G completions per prompt (B = P * G).

Per completion token t of trajectory b (token y_bt = input_ids[b, t], scored by the logits at
t - 1) the objective uses

    ratio_bt = exp(logp_bt - old_logp_bt)                              (ratio_level "token")
             = sg[s_b] pi(y_bt) / sg[pi(y_bt)],  s_b = exp(mean_t (logp_bt - old_logp_bt))
                                                          (ratio_level "sequence": GSPO-token)
    pg_bt    = -min(ratio_bt A_b, clip(ratio_bt, 1 - clip_eps, 1 + clip_eps_high) A_b)
               (clip_ratio_max c: ratio_bt's value capped at c in the first term, dual clipping)
             = -sg[min(ratio_bt, cispo_cap)] A_b logp_bt                (policy_loss "cispo")
               (with batch.old_logps; without them the ratio is exactly 1, nothing is clipped,
               and pg_bt = -A_b logp_bt: the paper's loss value, the surrogate's gradient)
    pg_bt   *= is_bt   (behaviour_correction "tis" / "mis" only: the detached importance weight
               between the sampler's distribution and the policy, ``behaviour_weights``)
    pg_bt   *= [H_bt >= q]  (top_entropy_quantile rho < 1 only: q the (1 - rho) quantile of the
               entropies H over the completion tokens, ``high_entropy_mask``)
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

A mixture-of-experts model adds router_aux_loss_coef * aux * raw / z when that coefficient is
> 0 (``router_terms``: aux the gradient forward's load-balancing loss, raw this part's
``raw_normalizer`` and z the whole batch's, so that microbatches and devices add up to the mean
of their aux weighted by their share).

The forwards: one gradient forward with the adapter (LoRA dropout there only), and, only when
some term needs it, one shared base forward (lora=None, stop_gradient) that serves ARCA's
h_base, divergence's reference log-probs and the KL term together (``arca_jax.grpo.signals``,
the pipeline the trainer's per-method logging shares). ``forwards_needed`` says which run.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from arca_jax import diagnostics, qwen3
from arca_jax.batch import Batch, as_batch
from arca_jax.grpo import signals
from arca_jax.grpo.config import ESTIMATORS, GRPOConfig
from arca_jax.grpo.signals import completion_valid

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Advantages and per-token terms
# --------------------------------------------------------------------------------------------


def advantages(rewards: Array, estimator: str = "grpo", *, eps: float = 1e-6) -> Array:
    """Group-relative advantages.

    rewards: [P, G] one row per prompt, G completions each.
    estimator: "grpo": (r - mean) / max(std, eps), std unbiased (ddof = 1);
               "rloo": r - mean of the other G - 1 rewards of the group;
               "dr_grpo": r - mean;
               "grpo_batch_std": (r - mean) / max(std of all P G rewards, eps) (TRL's
               ``scale_rewards="batch"``; the group mean with the batch's std, as "Tricks or
               Traps? A Deep Dive into RL for LLM Reasoning" recommends).
    eps: floor of the std ("grpo", "grpo_batch_std"). A group of identical rewards gets
        advantages 0.
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
    if estimator == "grpo_batch_std":
        return (r - mean) / jnp.maximum(jnp.std(r, ddof=1), eps)
    if estimator == "rloo":
        return (r - mean) * (G / (G - 1))  # = r - (sum - r) / (G - 1)
    return r - mean


def importance_ratio(logps: Array, old_logps: Array, *, level: str = "token",
                     valid: Optional[Array] = None) -> Array:
    """The policy's ratio to the old policy per token [B, T] (``clipped_policy_loss``'s r):
    "token": exp(logp_bt - old_logp_bt); "sequence" (GSPO-token): the value s_b on every token of
    row b, with gradient s_b grad log pi(y_bt) (valid [B, T] bool required)."""
    if level == "sequence":
        if valid is None:
            raise ValueError('level="sequence" needs the valid mask')
        v = jnp.asarray(valid) != 0
        n = jnp.maximum(jnp.sum(v, axis=-1, keepdims=True), 1).astype(jnp.float32)
        log_s = jnp.sum(jnp.where(v, logps - old_logps, 0.0), axis=-1, keepdims=True) / n
        log_s = jax.lax.stop_gradient(log_s)  # [B, 1]
        return jnp.exp(log_s + (logps - jax.lax.stop_gradient(logps)))  # value exp(log_s)
    if level == "token":
        return jnp.exp(logps - old_logps)
    raise ValueError(f"ratio level {level!r}; valid: token, sequence")


def cispo_policy_loss(logps: Array, old_logps: Array, adv: Array, cap: float, *,
                      level: str = "token", valid: Optional[Array] = None
                      ) -> Tuple[Array, Array, Array]:
    """CISPO's policy term per token (MiniMax-M1, arXiv 2506.13585; TRL's ``loss_type="cispo"``):
    -sg[min(r, cap)] A log pi, r the `importance_ratio` at `level`. Every token keeps its
    gradient, sg[min(r, cap)] A grad log pi. logps, old_logps, adv: [B, T].
    Returns (loss [B, T], ratio [B, T] (r's value), capped [B, T] bool: r > cap, the tokens
    whose weight the cap truncated)."""
    ratio = importance_ratio(logps, old_logps, level=level, valid=valid)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, cap))
    return -weight * adv * logps, jax.lax.stop_gradient(ratio), ratio > cap


def clipped_policy_loss(logps: Array, old_logps: Array, adv: Array, clip_low: float,
                        clip_high: float, *, level: str = "token",
                        valid: Optional[Array] = None,
                        ratio_max: Optional[float] = None) -> Tuple[Array, Array, Array]:
    """PPO clipped surrogate per token, with a token-level or a sequence-level (GSPO) ratio.

    logps, old_logps: [B, T]; adv: [B, T] (broadcast advantages).
    level: "token": r_bt = exp(logp_bt - old_logp_bt) (PPO, GRPO).
           "sequence": GSPO (Zheng et al. 2025, arXiv 2507.18071) in its GSPO-token form (paper
           eq. 13-14): with s_b = (pi(y_b) / pi_old(y_b))^(1 / |y_b|)
           = exp(sum_t v_bt (logp_bt - old_logp_bt) / sum_t v_bt) over the row's valid tokens v,
           r_bt = sg[s_b] pi(y_bt) / sg[pi(y_bt)]: its value is s_b on every token of the row (one
           ratio, clipped per sequence), its gradient s_b grad log pi(y_bt), so a token weight w_bt
           still scales token t's gradient. With w = 1/|y_b| this is GSPO's gradient (eq. 10-11).
    valid: [B, T] bool, required for "sequence" (the tokens the geometric mean runs over).
    ratio_max: c > 1 + clip_high, dual clipping (verl's clip_ratio_c, TRL's delta): r's value
        capped at c in the first term, -min(min(r, c) A, clip(r) A); it matters for A < 0 and
        r > c only, where the loss becomes the constant -c A. None: off.
    Returns (loss [B, T] = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),
             ratio [B, T] (the value of r), clipped [B, T] bool: the clipped branch is active,
             i.e. the token contributes no gradient: r > 1 + clip_high with A > 0 or
             r < 1 - clip_low with A < 0 (or r > ratio_max with A < 0); for "sequence" the same
             for every token of a row).
    """
    ratio = importance_ratio(logps, old_logps, level=level, valid=valid)
    capped = ratio if ratio_max is None else jnp.minimum(ratio, ratio_max)
    unclipped = capped * adv
    clipped_val = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -jnp.where(unclipped <= clipped_val, unclipped, clipped_val)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    if ratio_max is not None:
        clipped = clipped | ((adv < 0) & (ratio > ratio_max))
    return loss, ratio, clipped


def high_entropy_mask(entropies: Array, valid: Array, quantile: float,
                      axis_name: Optional[str] = None) -> Array:
    """The completion tokens whose entropy reaches the `quantile` q of the entropies over all
    ``valid`` tokens (as TRL's ``get_high_entropy_mask``: ``torch.quantile``'s linear
    interpolation between the sorted values at positions floor and ceil of q (n - 1)).

    entropies, valid: [B, T] (valid bool). axis_name: a pmap / shard_map axis whose devices' tokens
    count together (gathered); None: these arrays' tokens (on a mesh, the global array's).
    Returns [B, T] bool, False off ``valid``; all False when no token is valid.
    """
    v = jnp.asarray(valid) != 0
    x = jnp.where(v, entropies.astype(jnp.float32), jnp.inf).reshape(-1)
    n = jnp.sum(v)
    if axis_name is not None:
        x = jax.lax.all_gather(x, axis_name, tiled=True)
        n = jax.lax.psum(n, axis_name)
    s = jnp.sort(x)  # the valid entropies first, then +inf
    pos = quantile * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n, 1) - 1)
    threshold = s[lo] + (pos - lo) * (s[hi] - s[lo])
    return v & (entropies >= threshold)


def k3_kl(logps: Array, ref_logps: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def behaviour_weights(logps_before: Array, behaviour_logps: Array, valid: Array, *,
                      method: str, level: str, cap: float
                      ) -> Tuple[Array, Tuple[Array, Array, Array, Array]]:
    """Importance weights between the distribution the sampler drew from and the policy.

    Truncated importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training") and masked importance sampling (MIS; Liu et al. 2025,
    "When Speed Kills Stability"), as TRL's GRPOTrainer defines them
    (``vllm_importance_sampling_correction``, modes token_/sequence_ truncate/mask, cap C):

        d_bt  = logps_before_bt - behaviour_logps_bt                over valid tokens
        ratio = exp(d_bt)                                            ("token": one per token)
              = exp(sum_t d_bt)  (the product of the row's token ratios; "sequence")
        "tis": is = min(ratio, C)           "mis": is = ratio where ratio <= C, else 0

    logps_before: [B, T], the numerator: the policy's log-probs before this update, detached
        (TRL's ``old_per_token_logps``, recomputed by the trainer before the update): the loss
        passes ``batch.old_logps`` when present, else the gradient forward's own log-probs under
        ``stop_gradient`` (the same policy when num_iterations = 1).
    behaviour_logps: [B, T], ``Batch.behaviour_logps``: log-probs under the distribution the
        sampler actually drew from (temperature, top-k, top-p applied).
    valid: [B, T] bool. method: "tis" or "mis". level: "token" or "sequence". cap: C > 0.
    Returns (is [B, T] float32, detached, 0 off ``valid``; to multiply the per-token policy loss
    (TRL does so after the clipped surrogate and before the KL term), and the additive
    statistics (ratio sum, units, units above C, ratio max) over the units: valid tokens
    ("token") or rows with a valid token ("sequence"), of the uncapped ratio).
    """
    v = jnp.asarray(valid) != 0
    d = jnp.where(v, jax.lax.stop_gradient(logps_before).astype(jnp.float32)
                  - jnp.asarray(behaviour_logps).astype(jnp.float32), 0.0)
    if level == "sequence":
        units = jnp.any(v, axis=-1)  # [B]
        ratio = jnp.exp(jnp.sum(d, axis=-1))  # [B]
    elif level == "token":
        units = v
        ratio = jnp.exp(d)
    else:
        raise ValueError(f"correction level {level!r}; valid: token, sequence")
    above = ratio > cap
    if method == "tis":
        w = jnp.minimum(ratio, cap)
    elif method == "mis":
        w = jnp.where(above, 0.0, ratio)
    else:
        raise ValueError(f"behaviour correction {method!r}; valid: tis, mis")
    if level == "sequence":
        w = jnp.broadcast_to(w[:, None], v.shape)
    w = jax.lax.stop_gradient(jnp.where(v, w, 0.0))
    stats = (jnp.sum(jnp.where(units, ratio, 0.0)), jnp.sum(units).astype(jnp.float32),
             jnp.sum(units & above).astype(jnp.float32), jnp.max(jnp.where(units, ratio, 0.0)))
    return w, jax.lax.stop_gradient(stats)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@struct.dataclass
class LossStats:
    """Additive statistics of one loss evaluation (sums and counts, so that microbatches and
    devices combine exactly: add them, take the max of the ``*_max`` fields).

    rows: rows with >= 1 completion token. tokens: completion tokens. The ``*_sum`` fields are
    sums over completion tokens (``gini_sum``/``eff_sum`` over rows, with their own counts).
    ``is_*``: the behaviour correction's importance ratio (``behaviour_weights``; 0 when
    behaviour_correction is "none"): its sum, max and the count above the cap over ``is_units``
    (completion tokens, or rows at correction_level "sequence").
    residual_layer_sum: [S] the per-layer ARCA residuals summed over completion tokens
    (``Signals.residual_layers``; S = 1 for arca_layers "final"; 0 when no residual is read).
    Mixture-of-experts models only (None for dense ones; see ``router_shape``), from the
    gradient forward: aux_sum, the load-balancing loss times ``aux_weight``, the part's share of
    the aggregation's denominator (``raw_normalizer``); expert_load_sum [Ls, E], each sparse
    layer's expert load times ``router_tokens``, the real tokens routed.
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
    is_ratio_sum: Array
    is_units: Array
    is_capped: Array
    is_ratio_max: Array
    residual_layer_sum: Array
    aux_sum: Optional[Array] = None
    aux_weight: Optional[Array] = None
    expert_load_sum: Optional[Array] = None
    router_tokens: Optional[Array] = None

    def combine(self, other: "LossStats") -> "LossStats":
        return jax.tree_util.tree_map(jnp.add, self, other).replace(
            residual_norm_max=jnp.maximum(self.residual_norm_max, other.residual_norm_max),
            is_ratio_max=jnp.maximum(self.is_ratio_max, other.is_ratio_max))

    def all_reduce(self, axis_name: str) -> "LossStats":
        """Sums (max for the ``*_max`` fields) over a pmap/shard_map axis."""
        summed = jax.lax.psum(self, axis_name)
        return summed.replace(residual_norm_max=jax.lax.pmax(self.residual_norm_max, axis_name),
                              is_ratio_max=jax.lax.pmax(self.is_ratio_max, axis_name))

    def metrics(self) -> dict:
        """Means: mean per-token KL, clip fraction, entropy (nats) and residual norm; mean Gini
        and EffN/T over eligible rows (0 and 1 when none); mean completion length per row; the
        behaviour ratio's mean, max and fraction above the cap (0 without a correction); the
        mean residual per measured layer [S] (their mean is residual_norm_mean); a
        mixture-of-experts model's load-balancing loss (``aux_loss``, the value the objective
        weighs by ``router_aux_loss_coef``) and each sparse layer's expert load [Ls, E] (rows sum
        to 1), None for a dense model."""
        tok = jnp.maximum(self.tokens, 1.0)
        units = jnp.maximum(self.is_units, 1.0)
        router = {"aux_loss": None, "expert_load": None}
        if self.aux_sum is not None:
            router = {"aux_loss": self.aux_sum / jnp.maximum(self.aux_weight, 1e-30),
                      "expert_load": self.expert_load_sum / jnp.maximum(self.router_tokens, 1.0)}
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
            behaviour_ratio_mean=self.is_ratio_sum / units,
            behaviour_ratio_max=self.is_ratio_max,
            behaviour_capped_fraction=self.is_capped / units,
            residual_norm_layers=self.residual_layer_sum / tok,
            **router,
        )


def router_shape(config: qwen3.Qwen3Config) -> Optional[Tuple[int, int]]:
    """(Ls, E) of a mixture-of-experts model with sparse layers: the shape of its per-layer
    expert load; None for a dense model (no routing statistics)."""
    if not isinstance(config, qwen3.Qwen3MoeConfig) or not any(config.sparse_layers):
        return None
    return sum(config.sparse_layers), config.num_experts


class RouterTerms(NamedTuple):
    """The gradient forward's routing of one part of the batch: aux [] the load-balancing loss
    (transformers' ``aux_loss``), weight [] the part's ``raw_normalizer``, load [Ls, E] the
    sparse layers' expert load, tokens [] the real tokens routed."""

    aux: Array
    weight: Array
    load: Array
    tokens: Array


def router_terms(out: qwen3.ModelOutput, batch: Batch, valid: Array, *,
                 config: qwen3.Qwen3Config, grpo_config: GRPOConfig) -> Optional[RouterTerms]:
    """`RouterTerms` of a forward's output (None for a dense model)."""
    if router_shape(config) is None:
        return None
    b = batch
    tokens = (jnp.asarray(b.input_ids.size, jnp.float32) if b.attention_mask is None
              else jnp.sum(b.attention_mask != 0).astype(jnp.float32))
    aux = qwen3.moe.load_balancing_loss(out.expert_load, out.router_prob,
                                        config.num_experts_per_tok)
    return RouterTerms(aux=aux, weight=raw_normalizer(valid, grpo_config),
                       load=out.expert_load, tokens=tokens)


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


def forwards_needed(grpo_config: GRPOConfig) -> Tuple[str, ...]:
    """Model forwards one loss evaluation runs: ("policy",) or ("policy", "base").

    The base forward (adapter off) runs only for ARCA (h_base), divergence (reference
    log-probs) or kl_beta > 0 (reference log-probs), and once for all of them."""
    need = signals.signals_needed([grpo_config.weighting], kl=grpo_config.kl_beta > 0)
    return ("policy", "base") if signals.needs_base_forward(need) else ("policy",)


def policy_logprobs(lora, params, batch: Union[Batch, Mapping[str, Any]], *,
                    config: qwen3.Qwen3Config, lora_scale: float,
                    grpo_config: GRPOConfig = GRPOConfig()) -> Array:
    """[B, T] float32 log-probs of input_ids under the adapted policy (no dropout), aligned with
    input_ids (0 at invalid positions): the ``old_logps`` for num_iterations > 1."""
    b = as_batch(batch)
    valid = completion_valid(b)
    h = signals.policy_hidden(lora, params, b, config=config, lora_scale=lora_scale,
                              grpo_config=grpo_config)
    lp, _ = signals.aligned_logprobs(params, h, b, valid, config=config,
                                     grpo_config=grpo_config, with_entropy=False)
    return lp


def loss_fn(lora, params, batch: Union[Batch, Mapping[str, Any]], *, config: qwen3.Qwen3Config,
            lora_scale: float, grpo_config: GRPOConfig, lora_dropout: float = 0.0,
            rng: Optional[Array] = None, normalizer: Optional[Array] = None,
            mesh=None, axis_name: Optional[str] = None) -> Tuple[Array, LossStats]:
    """The GRPO loss of one batch (see the module doc) and its statistics.

    lora: adapter tree (``arca_jax.lora``), the argument to differentiate.
    params: frozen base parameters.
    batch: ``Batch`` (or a dict with its fields); old_logps required when num_iterations > 1,
        behaviour_logps when behaviour_correction is not "none".
    config: model config (static). lora_scale: adapter scaling (static Python float).
    grpo_config: ``GRPOConfig`` (static).
    lora_dropout: dropout rate on the adapter input, gradient forward only; needs ``rng``.
    rng: dropout key (the train step passes fold_in(state.rng, state.step)).
    normalizer: the aggregation's denominator; None computes it from this batch
        (``loss_normalizer``). The train step passes the global batch's value so that
        microbatches and devices add up to the large-batch loss.
    mesh: the mesh of a "mesh" train step (static): both forwards keep each device's rows
        (``signals.policy_forward``).
    axis_name: the pmap axis of a "pmap" train step: top_entropy_quantile's quantile runs over
        every device's tokens (``high_entropy_mask``).

    Returns: (loss [] float32, ``LossStats``).
    """
    g = grpo_config
    b = as_batch(batch)
    if g.num_iterations > 1 and b.old_logps is None:
        raise ValueError("num_iterations > 1 needs batch.old_logps (see policy_logprobs)")
    if g.behaviour_correction != "none" and b.behaviour_logps is None:
        raise ValueError(f"behaviour_correction {g.behaviour_correction!r} needs "
                         "batch.behaviour_logps (batch.build_batch)")
    B, T = b.input_ids.shape
    valid = completion_valid(b)  # [B, T] aligned with input_ids
    validf = valid.astype(jnp.float32)

    # Gradient forward (adapter on, dropout here only), then the signals the weighting reads
    # (one shared base forward when any needs it) and the weights: `arca_jax.grpo.signals`.
    need = signals.signals_needed([g.weighting], kl=g.kl_beta > 0) | {"entropies"}
    out = signals.policy_forward(lora, params, b, config=config, lora_scale=lora_scale,
                                 grpo_config=g, lora_dropout=lora_dropout, rng=rng,
                                 remat=g.remat, layers=signals.needs_layers(g, need), mesh=mesh)
    h = out.hidden  # [B, T, D]; out.layers [L, B, T, D] when ARCA reads decoder layers
    sig = signals.token_signals(params, b, valid, h, config=config, grpo_config=g, need=need,
                                h_layers=out.layers, mesh=mesh)
    logps, entropies, ref_logps = sig.logps, sig.entropies, sig.ref_logps  # [B, T]
    weights = signals.method_weights(g.weighting, sig, valid, g)  # [B, T], detached
    sg_logps = jax.lax.stop_gradient(logps)

    adv = jnp.broadcast_to(b.advantages.astype(jnp.float32)[:, None], (B, T))
    if b.old_logps is None:
        # On-policy: the ratio is exactly 1 and never clipped. The paper's form -A log pi has the
        # PPO surrogate's gradient at ratio 1 (d ratio = d log pi) and the paper's loss value.
        pg = -adv * logps
        clipped = jnp.zeros((B, T), bool)
    else:
        old = jnp.where(valid, b.old_logps.astype(jnp.float32), sg_logps)  # padding: ratio 1
        if g.policy_loss == "cispo":
            pg, _, clipped = cispo_policy_loss(logps, old, adv, g.cispo_cap,
                                               level=g.ratio_level, valid=valid)
        else:
            pg, _, clipped = clipped_policy_loss(logps, old, adv, g.clip_eps, g.clip_high,
                                                 level=g.ratio_level, valid=valid,
                                                 ratio_max=g.clip_ratio_max)
    pg = jnp.where(valid, pg, 0.0)
    if g.top_entropy_quantile < 1.0:
        pg = pg * high_entropy_mask(jax.lax.stop_gradient(entropies), valid,
                                    1.0 - g.top_entropy_quantile, axis_name)
    is_stats = None
    if g.behaviour_correction != "none":
        before = sg_logps if b.old_logps is None else old  # the policy before this update
        is_w, is_stats = behaviour_weights(before, b.behaviour_logps, valid,
                                           method=g.behaviour_correction,
                                           level=g.correction_level, cap=g.correction_cap)
        pg = pg * is_w

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
    router = router_terms(out, b, valid, config=config, grpo_config=g)
    if router is not None and g.router_aux_loss_coef > 0:
        numerator = numerator + g.router_aux_loss_coef * router.weight * router.aux
    z = loss_normalizer(b, g) if normalizer is None else normalizer
    S = signals.residual_layer_count(g, config.num_hidden_layers)
    return numerator / z, _loss_stats(valid, weights, pg, kl, clipped, entropies,
                                      sig.residual_norms, sig.residual_layers, is_stats, S,
                                      router)


def _loss_stats(valid, weights, pg, kl, clipped, entropies, residual, residual_layers, is_stats,
                num_layers: int, router: Optional[RouterTerms] = None) -> LossStats:
    """The additive statistics of one loss evaluation (all [B, T], 0 off ``valid``;
    residual_layers [S, B, T] or None, S = ``num_layers``; is_stats: ``behaviour_weights``'
    statistics or None; router: a mixture-of-experts model's ``router_terms``, or None)."""
    validf = valid.astype(jnp.float32)
    rows = diagnostics.concentration_per_row(weights, valid)
    res = jnp.zeros_like(pg) if residual is None else residual
    per_layer = (jnp.zeros((num_layers,), jnp.float32) if residual_layers is None
                 else jnp.sum(residual_layers, axis=(1, 2)))
    if is_stats is None:
        is_stats = (jnp.zeros((), jnp.float32),) * 4
    return LossStats(
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
        is_ratio_sum=is_stats[0],
        is_units=is_stats[1],
        is_capped=is_stats[2],
        is_ratio_max=is_stats[3],
        residual_layer_sum=per_layer,
        **({} if router is None else dict(
            aux_sum=jax.lax.stop_gradient(router.aux * router.weight), aux_weight=router.weight,
            expert_load_sum=router.load * router.tokens, router_tokens=router.tokens)),
    )
