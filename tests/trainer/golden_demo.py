"""Fixed-seed reference outputs of the embedded demo and the sampler, recorded before a refactor
and compared after it (tests/trainer/test_golden.py): identical tokens, rewards and evaluations;
metrics equal up to float rounding.

    python tests/trainer/golden_demo.py --write             # re-record both parts
    python tests/trainer/golden_demo.py --write sampler     # re-record one part (demo | sampler)

The demo part was recorded before the consolidation; the sampler part was re-recorded in float32
(see `sampler_tokens`) at the commit that made it float32, and its two top-p entries when the
nucleus draw stopped sorting the vocabulary (`draw._nucleus`: the same distribution, searched in
index order, so other tokens for the same key).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "golden_demo.json")

if __name__ == "__main__":  # as a script: the tests' settings, and tests/ on sys.path (fixtures)
    sys.path.insert(0, os.path.dirname(HERE))
    import conftest  # noqa: F401  (CPU, 8 devices, highest matmul precision: as in the tests)

from fixtures import TIMING, read_jsonl  # noqa: E402

DEMO = ["train.steps=4", "train.seed=7", "optim.warmup_steps=0", "rollout.prompts_per_step=3", "rollout.group_size=4",
        "rollout.max_new_tokens=48", "task.num_eval_problems=6", "task.max_train_samples=64",
        "train.save_every=0", "train.samples_every=1", "train.samples_per_log=2",
        "grpo.weighting=arca", "grpo.sharpening=2.0", "optim.learning_rate=1e-2"]


def demo_run() -> dict:
    """metrics (timings removed), evals and samples of a 4-step run of the embedded demo."""
    from arca_jax import cli

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        args = ["train", "--output-dir", run_dir]
        for o in DEMO:
            args += ["--set", o]
        code = cli.main(args)
        if code not in (0, None):
            raise RuntimeError(f"demo run failed with exit code {code}")
        metrics = [{k: v for k, v in r.items() if k not in TIMING}
                   for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
        return {"metrics": metrics, "evals": read_jsonl(os.path.join(run_dir, "eval.jsonl")),
                "samples": read_jsonl(os.path.join(run_dir, "samples.jsonl"))}


def sampler_tokens() -> dict:
    """Greedy and sampled tokens (and log-probs) of the shipped model with a random adapter, for
    fixed prompts and keys.

    In float32: the shipped weights are bfloat16, and XLA:CPU's dot kernels accumulate in an
    order that depends on the host's instruction set (AVX2, AVX-512), which moves bfloat16
    activations by a rounding step now and then; over three layers that changed log-probs by up
    to 2e-2 and a sampled token between hosts. float32 keeps such differences near 1e-6."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from arca_jax import config, hf, lora, sampling

    path = config.ModelConfig().resolved_path()
    model_config, params = hf.load_pretrained(path)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapter = lora.init_lora(model_config, lcfg, jax.random.PRNGKey(1))
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    adapter = jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    rng = np.random.default_rng(3)
    ids = np.zeros((6, 12), np.int32)
    mask = np.zeros((6, 12), np.int32)
    for b, n in enumerate([12, 5, 9, 3, 12, 7]):
        ids[b, 12 - n:] = rng.integers(3, model_config.vocab_size, n)
        mask[b, 12 - n:] = 1
    out = {}
    for name, kw in {"greedy": dict(greedy=True),
                     "sampled": dict(temperature=1.0),
                     "sampled_top_p": dict(temperature=0.7, top_p=0.9)}.items():
        for use_lora in (False, True):
            res = sampling.generate(params, ids, mask, config=model_config,
                                    rng=jax.random.PRNGKey(11), max_new_tokens=20,
                                    lora=adapter if use_lora else None, lora_scale=lcfg.scaling,
                                    eos_id=model_config.eos_token_id, **kw)
            out[f"{name}{'_lora' if use_lora else ''}"] = {
                "tokens": np.asarray(res.tokens).tolist(), "mask": np.asarray(res.mask).tolist(),
                "logps": np.asarray(res.logps).round(6).tolist()}
    return out


PARTS = {"demo": demo_run, "sampler": sampler_tokens}


def record(parts=tuple(PARTS)) -> dict:
    """The golden file with `parts` recorded anew and the others as they are."""
    golden = {}
    if os.path.exists(GOLDEN):
        with open(GOLDEN) as f:
            golden = json.load(f)
    return {**golden, **{p: PARTS[p]() for p in parts}}


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--write" or not set(args[1:]) <= set(PARTS):
        sys.exit("usage: python tests/trainer/golden_demo.py --write [demo] [sampler]")
    golden = record(tuple(args[1:]) or tuple(PARTS))
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1)
    print(f"wrote {GOLDEN}")
