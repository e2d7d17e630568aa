"""GRPO with token-level credit assignment (ARCA): the public entry point.

    from arca_jax.grpo import (Batch, GRPOConfig, TrainState, advantages, loss_fn,
                               make_optimizer, make_train_step)

Modules, one job each:
    config      ``GRPOConfig``, the objective's static settings
    logprobs    chunked token log-probs and entropies from final hidden states
    signals     the one salience pipeline: forwards -> per-token signals -> token weights
    objective   advantages, the clipped surrogate, KL, aggregation, ``loss_fn``
    step        ``TrainState``, the optimiser, ``make_train_step`` (jit / pmap / mesh)
The batch type is ``arca_jax.batch.Batch``; device layouts are in ``arca_jax.parallel``.
"""

from arca_jax.batch import Batch, as_batch
from arca_jax.grpo.config import (AGGREGATIONS, ARCA_LAYER_SETS, BEHAVIOUR_CORRECTIONS,
                                  CORRECTION_LEVELS, ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS,
                                  GRPOConfig)
from arca_jax.grpo.logprobs import next_tokens, shift_right, token_logprobs
from arca_jax.grpo.objective import (LossStats, advantages, behaviour_weights,
                                     cispo_policy_loss, clipped_policy_loss, forwards_needed,
                                     high_entropy_mask, importance_ratio, k3_kl, loss_fn,
                                     loss_normalizer, policy_logprobs, raw_normalizer)
from arca_jax.grpo.signals import (Signals, all_method_weights, completion_valid,
                                   floored_reference, method_weights, needs_layers,
                                   policy_forward, residual_layer_count, residual_layers,
                                   residual_norms, token_signals)
from arca_jax.grpo.step import (StepMetrics, TrainState, make_optimizer, make_schedule,
                                make_train_step)
from arca_jax.parallel import (make_mesh, param_partition_spec, param_shardings, replicate,
                               replicate_on_mesh, shard_batch, shard_params, unreplicate)

__all__ = [
    "AGGREGATIONS", "ARCA_LAYER_SETS", "BEHAVIOUR_CORRECTIONS", "CORRECTION_LEVELS",
    "ESTIMATORS", "POLICY_LOSSES", "RATIO_LEVELS",
    "Batch", "GRPOConfig", "LossStats", "Signals", "StepMetrics", "TrainState", "advantages",
    "all_method_weights", "as_batch", "behaviour_weights", "cispo_policy_loss",
    "clipped_policy_loss", "completion_valid", "floored_reference", "forwards_needed",
    "high_entropy_mask", "importance_ratio", "k3_kl", "loss_fn", "loss_normalizer", "make_mesh",
    "make_optimizer", "make_schedule", "make_train_step", "method_weights", "needs_layers",
    "next_tokens", "param_partition_spec", "param_shardings", "policy_forward",
    "policy_logprobs", "raw_normalizer", "replicate", "replicate_on_mesh",
    "residual_layer_count", "residual_layers", "residual_norms",
    "shard_batch", "shard_params", "shift_right", "token_logprobs", "token_signals",
    "unreplicate",
]
