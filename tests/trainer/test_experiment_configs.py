"""The paper's seven runs and the tiny sweep are valid configs with the paper's settings."""

import glob
import os

import pytest

from arca_jax import config
from fixtures import REPO

ROOT = os.path.join(REPO, "experiments", "configs")
ARMS = {("uniform", 64), ("surprisal", 64), ("entropy_reduction", 64), ("divergence", 64),
        ("arca", 4), ("arca", 16), ("arca", 64)}


@pytest.mark.parametrize("kind", ["paper", "tiny"])
def test_seven_arms(kind):
    files = sorted(glob.glob(os.path.join(ROOT, kind, "*.yaml")))
    cfgs = [config.load(f) for f in files]
    assert {(c.grpo.weighting, c.lora.rank) for c in cfgs} == ARMS and len(cfgs) == 7
    for c in cfgs:
        assert c.lora.alpha == 2 * c.lora.rank and c.grpo.sharpening == 2.0
        assert c.train.seed == 1337 and c.grpo.estimator == "grpo"
        assert len({x.optim.learning_rate for x in cfgs}) == 1  # one rate for every arm


def test_paper_settings():
    for f in glob.glob(os.path.join(ROOT, "paper", "*.yaml")):
        c = config.load(f)
        assert c.model.path == "Qwen/Qwen3-1.7B-Base" and c.task.name == "math"
        assert c.lora.dropout == 0.05 and len(c.lora.targets) == 7
        assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.warmup_steps,
                c.optim.max_grad_norm) == (5e-6, 0.0, 10, 1.0)
        assert (c.rollout.prompts_per_step, c.rollout.group_size, c.train.microbatches) == (8, 4, 4)
        assert (c.rollout.max_prompt_tokens, c.rollout.max_new_tokens) == (512, 512)
        assert (c.rollout.temperature, c.rollout.top_p) == (1.0, 0.95)
        assert (c.train.steps, c.train.save_every, c.train.pass_k) == (100, 20, 4)
        assert c.task.num_eval_problems == 200
        # the authors' prompt, reward and prompt truncation (tests/test_paper_fidelity_tasks.py)
        assert (c.task.prompt_style, c.task.reward_mode, c.rollout.prompt_truncation) == (
            "reference", "reference", "right")
        # EOS outside the loss (Qwen3-Base pads with EOS) and bfloat16 logits, as the authors' code
        assert (c.rollout.eos_token, c.grpo.logits_dtype) == ("mask_if_pad", "bfloat16")
        assert c.rollout.top_k == 50  # transformers generate's default, as the authors sampled
