"""Tasks and rewards: MATH, GSM8K and an embedded arithmetic task, plus metrics and a char tokenizer.

The submodule ``arca_jax.tasks.math`` is this package's MATH reward (import it as
``from arca_jax.tasks import math as math_reward`` to keep the standard ``math`` visible).
"""
from arca_jax.tasks import arithmetic, gsm8k, metrics, tokenizer, verify_pool
from arca_jax.tasks import math as math_reward
from arca_jax.tasks.data import (
    ARITHMETIC_PROMPT_TEMPLATE,
    GSM8K_REFERENCE_TEMPLATE,
    MATH_INSTRUCTION,
    MATH_PROMPT_TEMPLATE,
    MATH_REFERENCE_TEMPLATE,
    PROMPT_STYLES,
    REWARD_MODES,
    Problem,
    Task,
    TaskDataError,
    format_prompt,
    load_task,
)
from arca_jax.tasks.math import ScoreResult, extract_boxed, normalize_answer, reward, score_batch
from arca_jax.tasks.metrics import greedy_accuracy, mean_pass_at_k, pass_at_k
from arca_jax.tasks.verify_pool import VerifyPool, VerifyPoolError, get_default_pool, shutdown_default_pool

__all__ = [
    "ARITHMETIC_PROMPT_TEMPLATE", "GSM8K_REFERENCE_TEMPLATE", "MATH_INSTRUCTION", "MATH_PROMPT_TEMPLATE",
    "MATH_REFERENCE_TEMPLATE", "PROMPT_STYLES", "Problem", "REWARD_MODES", "ScoreResult",
    "Task", "TaskDataError", "VerifyPool", "VerifyPoolError", "arithmetic", "extract_boxed",
    "format_prompt", "get_default_pool", "greedy_accuracy", "gsm8k", "load_task", "math_reward",
    "mean_pass_at_k", "metrics", "normalize_answer", "pass_at_k", "reward", "score_batch",
    "shutdown_default_pool", "tokenizer", "verify_pool",
]
