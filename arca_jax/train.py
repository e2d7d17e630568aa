"""The training program's entry point, `train(cfg, run_dir)`; the program lives in
`arca_jax.trainer` (setup, rollout, evaluate, samples, loop)."""

from arca_jax.trainer import (EvalResult, Model, RunDirError, Scorer, encode_prompts,  # noqa: F401
                              evaluate, load_model, step_prompt_indices, train)
