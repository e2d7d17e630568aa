"""The tiny pretrained model shipped with the package loads through the real checkpoint path and
generates; its tokenizer round-trips through transformers' AutoTokenizer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from arca_jax import hf, sampling
from arca_jax.config import ModelConfig
from arca_jax.tasks import load_task

PATH = ModelConfig().resolved_path()


def test_asset_is_small_and_documented():
    size = sum(os.path.getsize(os.path.join(PATH, f)) for f in os.listdir(PATH))
    assert size <= 5 * 1024 * 1024
    info = json.load(open(os.path.join(PATH, "pretraining.json")))
    assert 0.2 <= info["held_out_greedy_accuracy"] <= 0.8 and info["held_out_problems"] >= 200


def test_tiny_model_loads_and_solves_some_problems():
    config, params = hf.load_pretrained(PATH, dtype=jnp.float32)
    tok = AutoTokenizer.from_pretrained(PATH)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert 100_000 <= n <= 1_000_000 and config.vocab_size == len(tok)
    task = load_task("arithmetic", "test", max_samples=32)
    text = task.problems[0].prompt + task.problems[0].solution
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rows = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in task.problems]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(0),
                            max_new_tokens=96, greedy=True, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id)
    texts = tok.batch_decode([t[m.astype(bool)] for t, m in zip(np.asarray(out.tokens),
                                                              np.asarray(out.mask))],
                             skip_special_tokens=True)
    assert np.asarray(out.finished).mean() > 0.9  # the model learned to stop
    rewards = task.score_batch(texts, task.problems).rewards
    assert 0.0 < rewards.mean() < 1.0  # solves some, not all: room for RL
