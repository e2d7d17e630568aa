"""The README's Python example runs as written (on a random tiny checkpoint instead of Qwen3-1.7B)."""

import os
import re

import numpy as np

from fixtures import REPO, random_hf_model, tiny_hf_config

README = os.path.join(REPO, "README.md")


def test_readme_forward_example(tmp_path, monkeypatch):
    model = random_hf_model(tiny_hf_config(vocab=40000, hidden=32, heads=4, kv_heads=2, head_dim=8))
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)[0]
    code = code.replace("/path/to/Qwen3-1.7B-Base", str(tmp_path / "ckpt"))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].logits.shape == (2, 5, 40000)
    assert np.all(np.asarray(scope["residual"]) == 0)  # fresh adapter: B = 0
    assert scope["lcfg2"] == scope["lcfg"]


def test_readme_own_loop_example(tmp_path, monkeypatch):
    """The "your own loop" block: sample, build the batch, call the jitted train_step."""
    import jax.numpy as jnp

    model = random_hf_model(tiny_hf_config(vocab=64, hidden=32, heads=4, kv_heads=2, head_dim=8))
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)[1]
    assert "for step in range(100)" in code and "max_new_tokens=512" in code
    code = (code.replace("/path/to/Qwen3-1.7B-Base", str(tmp_path / "ckpt"))
            .replace("range(100)", "range(2)").replace("max_new_tokens=512", "max_new_tokens=6"))
    rng = np.random.default_rng(0)
    scope = {"prompt_ids": jnp.asarray(rng.integers(1, 64, (2, 5)), jnp.int32),
             "prompt_mask": jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32),
             "my_verifier": lambda out: jnp.asarray(
                 np.asarray(out.tokens)[:, 0].reshape(2, 4) % 2, jnp.float32)}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].step) + int(scope["metrics"].skipped_steps) == 2
    assert scope["batch"].input_ids.shape == (8, 5 + 6)
    assert np.isfinite(float(scope["metrics"].loss))
