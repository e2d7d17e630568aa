"""GRPO with token-level credit assignment (ARCA): the public entry point.

Re-exports the objective (``arca_jax.objective``), the chunked log-probs
(``arca_jax.logprobs``), the train step (``arca_jax.train_step``) and the device layouts
(``arca_jax.parallel``), so that users import everything from one place::

    from arca_jax.grpo import (Batch, GRPOConfig, TrainState, advantages, loss_fn,
                               make_optimizer, make_train_step)
"""

from arca_jax.logprobs import next_tokens, shift_right, token_logprobs
from arca_jax.objective import (AGGREGATIONS, ESTIMATORS, Batch, GRPOConfig, LossStats,
                                advantages, as_batch, clipped_policy_loss, completion_valid,
                                forwards_needed, k3_kl, loss_fn, loss_normalizer,
                                policy_logprobs, raw_normalizer)
from arca_jax.parallel import (make_mesh, param_partition_spec, param_shardings, replicate,
                               replicate_on_mesh, shard_batch, shard_params, unreplicate)
from arca_jax.train_step import (StepMetrics, TrainState, make_optimizer, make_schedule,
                                 make_train_step)

__all__ = [
    "AGGREGATIONS", "ESTIMATORS", "Batch", "GRPOConfig", "LossStats", "StepMetrics", "TrainState",
    "advantages", "as_batch", "clipped_policy_loss", "completion_valid", "forwards_needed",
    "k3_kl", "loss_fn", "loss_normalizer", "make_mesh", "make_optimizer", "make_schedule",
    "make_train_step", "next_tokens", "param_partition_spec", "param_shardings",
    "policy_logprobs", "raw_normalizer", "replicate", "replicate_on_mesh", "shard_batch",
    "shard_params", "shift_right", "token_logprobs", "unreplicate",
]
