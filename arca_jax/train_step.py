"""Former home of the train step; kept so that old imports work. See ``arca_jax.grpo.step``."""

from arca_jax.grpo.step import (MODES, StepMetrics, TrainState, make_optimizer,  # noqa: F401
                                make_schedule, make_train_step)
