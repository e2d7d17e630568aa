"""The training program, in small parts read top to bottom:

    setup      everything built from a `RunConfig`: model, tasks, optimiser, named random
               streams, mesh, train state, run directory, checkpoints
    rollout    prompts -> completions -> rewards -> advantages -> `Batch` (one path for one
               device, pmap, a mesh and several processes)
    evaluate   greedy accuracy and pass@k on the rollout path
    samples    samples.jsonl with every method's token weights
    programs   the packed train step: line counts per batch, programs prepared ahead
    loop       `train`: rollout, update, log, evaluate, checkpoint, resume
"""

from arca_jax.trainer import rollout as rollout_mod
from arca_jax.trainer.evaluate import EvalResult, evaluate, greedy_rewards
from arca_jax.trainer.loop import train
from arca_jax.trainer.rollout import (Rollout, Scorer, detokenize, encode_prompts, generate_rows,
                                      rollout, score_rows, step_prompt_indices)
from arca_jax.trainer.setup import (Model, RunDirError, Stream, build_optimizer, init_state,
                                    load_eval_task, load_model, load_run, load_train_task,
                                    lora_config, objective_config, prepare_run_dir, stream_key)

__all__ = [
    "EvalResult", "Model", "Rollout", "RunDirError", "Scorer", "Stream", "build_optimizer",
    "detokenize", "encode_prompts", "evaluate", "generate_rows", "greedy_rewards", "init_state",
    "load_eval_task", "load_model", "lora_config", "objective_config", "load_run", "load_train_task", "prepare_run_dir", "rollout", "score_rows",
    "step_prompt_indices", "stream_key", "train",
]
