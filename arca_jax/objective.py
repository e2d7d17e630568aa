"""Former home of the GRPO objective; kept so that old imports work. See ``arca_jax.grpo``."""

from arca_jax.batch import Batch, as_batch  # noqa: F401
from arca_jax.grpo.config import AGGREGATIONS, ESTIMATORS, GRPOConfig  # noqa: F401
from arca_jax.grpo.objective import (LossStats, advantages, clipped_policy_loss,  # noqa: F401
                                     forwards_needed, k3_kl, loss_fn, loss_normalizer,
                                     policy_logprobs, raw_normalizer)
from arca_jax.grpo.signals import (completion_valid, floored_reference,  # noqa: F401
                                   residual_norms)
