"""The README's Python example runs as written (on a random tiny checkpoint instead of Qwen3-1.7B)."""

import os
import re

import numpy as np

from hf_fixtures import random_hf_model, tiny_hf_config

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


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
