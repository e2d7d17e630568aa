"""GRPO objective settings (``GRPOConfig``): frozen, hashable, static under jit."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import jax.numpy as jnp

from arca_jax import credit, qwen3

ESTIMATORS = ("grpo", "rloo", "dr_grpo", "grpo_batch_std")
AGGREGATIONS = ("sequence", "token_mean", "dr_grpo")
RATIO_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo")
BEHAVIOUR_CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")
ARCA_LAYER_SETS = ("final", "all")  # or a tuple of decoder layer indices


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Objective settings. Frozen and hashable: static under jit.

    weighting: token credit: one of ``credit.MODES`` ("uniform", "surprisal",
        "entropy_reduction", "divergence", "arca"), another registered name
        (``credit.register``) or an import path "module:attribute" naming a ``credit.Weighting``
        (imported here, at validation; the string is what the config and the logs keep).
    sharpening: exponent s on (alpha + eps) before normalising (paper's sweep: 2.0).
    eps: added to every salience (``credit.token_weights``).
    estimator: advantage estimator the trainer uses with ``advantages`` ("grpo", "rloo",
        "dr_grpo"); the loss itself reads precomputed advantages from the batch.
    kl_beta: weight of the k3 KL penalty against the base model (adapter off); 0 disables it.
    clip_eps, clip_eps_high: PPO ratio clip range [1 - clip_eps, 1 + clip_eps_high]
        (clip_eps_high None: symmetric).
    clip_ratio_max: dual clipping (Ye et al. 2020, arXiv 1912.09729; verl's ``clip_ratio_c``,
        TRL's ``delta``, INTELLECT-2's two-sided GRPO): the ratio's value is capped at this bound
        (> 1 + clip_eps_high), so a token with a negative advantage whose ratio has grown past
        it loses its gradient instead of an unbounded push (``objective.clipped_policy_loss``);
        None: off.
    top_entropy_quantile: rho in (0, 1]: the policy term trains only the completion tokens whose
        entropy reaches the (1 - rho) quantile of the gradient forward's entropies over the
        batch's completion tokens (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939:
        rho = 0.2; TRL's ``top_entropy_quantile``); the others' policy loss is 0, the KL term and
        the aggregation's denominator are unchanged (``objective.high_entropy_mask``). Over all
        devices; with train.microbatches > 1, within each microbatch, as TRL's and verl's
        gradient accumulation compute it. 1.0: off.
    policy_loss: the policy term per token: "clip" (PPO / GRPO's clipped surrogate) or "cispo"
        (MiniMax-M1, arXiv 2506.13585, as TRL's ``loss_type="cispo"`` and ScaleRL write it: the
        ratio's value capped at ``cispo_cap`` and detached, times -A log pi: no token loses its
        gradient, a large ratio only stops growing its weight; ``objective.cispo_policy_loss``).
        cispo_cap: that cap (ScaleRL and TRL recommend 4 to 5).
    ratio_level: "token" (PPO / GRPO: one ratio per token) or "sequence" (GSPO, arXiv 2507.18071:
        the geometric mean of the row's token ratios, clipped per sequence, in the paper's
        GSPO-token form so that token weights still act per token; see
        ``objective.clipped_policy_loss``). GSPO's paper clips at 3e-4 / 4e-4 (clip_eps,
        clip_eps_high). Without ``old_logps`` every ratio is 1 and both levels are the same.
    behaviour_correction: importance correction between the sampler and the trainer ("none",
        "tis" truncated or "mis" masked importance sampling, with ``Batch.behaviour_logps``; see
        ``objective.behaviour_weights``). correction_level: "token" or "sequence" (one ratio per
        row: the product of its token ratios). correction_cap: C, the ratio's cap (TIS weights
        min(ratio, C); MIS drops tokens / rows whose ratio exceeds C).
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
        (cuDNN flash attention on a CUDA GPU with bf16 activations, the C++ kernel on CPU with
        float32 ones, else "einsum"), "einsum", "cpu-kernel", "cudnn", "sdpa-xla". The fused ones
        need each row's attention_mask to be one run of ones; packed batches take "einsum" or
        "cpu-kernel" only (others: the padded rows).
    attention_blocks: the einsum attention's query blocks (``qwen3.causal_blocks``: block i
        attends to the keys up to its end only; the same values, about (n + 1) / 2n of the
        scores); None: 4 on CPU, 1 elsewhere (``qwen3.resolve_attention_blocks``).
    scan_layers: both forwards run the decoder layers as one scan (True) or unrolled (False);
        None: unrolled on CPU for models of at most ``qwen3.CPU_UNROLL_LAYERS`` layers, scanned
        elsewhere (``qwen3.resolve_scan_layers``). The same values either way.
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
    logits_dtype: precision of the logits before the log-softmax, in the loss and in every
        salience (log-probs, entropies, reference log-probs). "float32" (default): the vocabulary
        projection accumulates and returns float32. "bfloat16": the float32 logits are rounded to
        bfloat16 first, then upcast (what transformers' Qwen3 in bfloat16 returns and the
        reference code upcasts: log-probs quantised by ~0.06-0.125 nats for |logit| in 8..32).
    arca_layers: where ARCA's residual ||h_adapted - h_base||_2 is measured, from the same two
        forwards: "final" (the paper: the final hidden state, after the final norm), "all" (every
        decoder layer's output, before the final norm) or a list of decoder layer indices
        [i, j, ...] (0-based, < num_hidden_layers); over several layers the per-layer residuals
        (each with the noise floor) are averaged. Layer outputs cost one [L, B, T, D] stacked
        output per forward (``qwen3.forward(return_layers=True)``); "final" none.
    arca_relative: divide each layer's residual by ||h_base|| at that token and layer (a
        scale-free residual; 0 where ||h_base|| is 0).
    router_aux_loss_coef: mixture-of-experts models (``qwen3.Qwen3MoeConfig``) only: c, the weight
        of the router's load-balancing loss in the objective, loss += c * aux with aux
        transformers' ``aux_loss`` of the gradient forward (``qwen3.moe.load_balancing_loss``
        over the sparse layers and the batch's real tokens; k at perfect balance). 0 (default):
        off, as the router is frozen (its gradient reaches only the attention adapters, through
        the hidden states the router reads). Over microbatches and devices the term is the mean
        of each part's aux weighted by its share of the aggregation's denominator
        (``objective.raw_normalizer``). The value is logged either way (``aux_loss``), with each
        sparse layer's expert load; a dense model ignores the option and logs null.
    """

    weighting: str = "arca"
    sharpening: float = 1.0
    eps: float = 1e-8
    estimator: str = "grpo"
    kl_beta: float = 0.0
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    clip_ratio_max: Optional[float] = None
    policy_loss: str = "clip"
    cispo_cap: float = 5.0
    top_entropy_quantile: float = 1.0
    num_iterations: int = 1
    loss_aggregation: str = "sequence"
    max_completion_length: Optional[int] = None
    logits_chunk: int = 128
    remat: Union[bool, str] = False
    noise_floor: float = 1e-5
    attention: str = "auto"
    attention_blocks: Optional[int] = None
    scan_layers: Optional[bool] = None
    lora_dtype: Optional[str] = None
    logits_grad_dtype: Optional[str] = None
    logits_dtype: str = "float32"
    ratio_level: str = "token"
    behaviour_correction: str = "none"
    correction_level: str = "token"
    correction_cap: float = 2.0
    arca_layers: Union[str, Tuple[int, ...]] = "final"
    arca_relative: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        layers = self.arca_layers
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                     for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"arca_layers must be 'final', 'all' or a non-empty list of "
                                 f"distinct layer indices >= 0, got {list(layers)!r}")
            object.__setattr__(self, "arca_layers", tuple(sorted(layers)))  # hashable
        elif layers not in ARCA_LAYER_SETS:
            raise ValueError(f"arca_layers {layers!r}; valid: 'final', 'all' or a list of "
                             "layer indices")
        if not isinstance(self.arca_relative, bool):
            raise ValueError(f"arca_relative must be true or false, got {self.arca_relative!r}")
        if not isinstance(self.weighting, str):
            raise ValueError(f"weighting must be a name or 'module:attribute' string, got "
                             f"{self.weighting!r}")
        try:
            credit.get(self.weighting)  # imports a "module:attribute" path
        except ValueError as e:
            raise ValueError(f"weighting: {e}") from None
        for name, valid in (("ratio_level", RATIO_LEVELS), ("policy_loss", POLICY_LOSSES),
                            ("behaviour_correction", BEHAVIOUR_CORRECTIONS),
                            ("correction_level", CORRECTION_LEVELS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if not self.cispo_cap > 1.0:
            raise ValueError(f"cispo_cap must be > 1, got {self.cispo_cap}")
        if self.policy_loss == "cispo" and self.clip_ratio_max is not None:
            raise ValueError("clip_ratio_max (dual clipping) acts on the clipped surrogate; "
                             "policy_loss 'cispo' caps its ratio with cispo_cap")
        if not self.correction_cap > 0:
            raise ValueError(f"correction_cap must be > 0, got {self.correction_cap}")
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
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if not self.clip_eps > 0 or (self.clip_eps_high is not None and not self.clip_eps_high > 0):
            raise ValueError("clip_eps and clip_eps_high must be > 0")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1] (1: off), got "
                             f"{self.top_entropy_quantile}")
        if self.clip_ratio_max is not None and not self.clip_ratio_max > 1.0 + self.clip_high:
            raise ValueError(f"clip_ratio_max must be > 1 + clip_eps_high = "
                             f"{1.0 + self.clip_high}, got {self.clip_ratio_max}")
        if not (isinstance(self.num_iterations, int) and self.num_iterations >= 1):
            raise ValueError(f"num_iterations must be an int >= 1, got {self.num_iterations!r}")
        if self.max_completion_length is not None and not self.max_completion_length >= 1:
            raise ValueError("max_completion_length must be >= 1")
        if not self.noise_floor >= 0:
            raise ValueError(f"noise_floor must be >= 0, got {self.noise_floor}")
        if not (isinstance(self.logits_chunk, int) and self.logits_chunk >= 1):
            raise ValueError(f"logits_chunk must be an int >= 1, got {self.logits_chunk!r}")
        if self.logits_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"logits_dtype must be 'float32' or 'bfloat16', got "
                             f"{self.logits_dtype!r}")
        qwen3.remat_policy(self.remat)  # raises ValueError for an unknown option
        if self.attention_blocks is not None:
            qwen3.resolve_attention_blocks(self.attention_blocks)  # validates
        if self.scan_layers is not None:
            qwen3.resolve_scan_layers(self.scan_layers, 1)  # validates
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
