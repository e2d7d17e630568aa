"""Former home of the chunked log-probs; kept so that old imports work. See ``arca_jax.grpo.logprobs``."""

from arca_jax.grpo.logprobs import next_tokens, shift_right, token_logprobs  # noqa: F401
