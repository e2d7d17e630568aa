"""`hf.load_tokenizer`: the tokenizer AutoTokenizer loads, without importing torch."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, Qwen2Tokenizer

from arca_jax import hf
from arca_jax.config import ModelConfig

TEXTS = ["Solve 12 + 7.\n\nProblem: what is 3*4?\n", "  leading spaces, tabs\tand ünïcödé  ",
         "<|endoftext|> after a special token", "\\boxed{42}", ""]


def _qwen_like(tmp_path, tokenizer_class="Qwen2Tokenizer"):
    """A small byte-level BPE tokenizer of Qwen3's class, saved as the Hub lays it out."""
    base = {chr(c): i for i, c in enumerate(range(33, 127))}
    merges = [("t", "h"), ("th", "e"), ("i", "s"), ("1", "2")]
    vocab = dict(base)
    for m in merges:
        vocab.setdefault("".join(m), len(vocab))
    vocab["Ġ"] = len(vocab)
    vocab["Ċ"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    d = tmp_path / "qwen_tok"
    tok.save_pretrained(d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg))
    return str(d)


def _same(a, b):
    assert type(a) is type(b)
    for t in TEXTS:
        assert a(t)["input_ids"] == b(t)["input_ids"]
        ids = b(t)["input_ids"]
        assert a.decode(ids) == b.decode(ids)
    assert (a.eos_token_id, a.pad_token_id) == (b.eos_token_id, b.pad_token_id)


def test_embedded_tokenizer_equals_autotokenizer():
    path = ModelConfig().resolved_path()
    _same(hf.load_tokenizer(path), AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("name", ["Qwen2Tokenizer", "Qwen2TokenizerFast"])
def test_hub_class_name_equals_autotokenizer(tmp_path, name):
    path = _qwen_like(tmp_path, name)
    _same(hf.load_tokenizer(path), AutoTokenizer.from_pretrained(path))


def test_unknown_or_missing_class_falls_back_to_autotokenizer(tmp_path):
    path = _qwen_like(tmp_path, "NoSuchTokenizerClass")
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    del cfg["tokenizer_class"]
    json.dump(cfg, open(cfg_path, "w"))
    _same(hf.load_tokenizer(path), AutoTokenizer.from_pretrained(path))


def test_loading_does_not_import_torch(tmp_path):
    pytest.importorskip("torch")  # only meaningful where torch is installed
    path = _qwen_like(tmp_path)
    code = ("import sys\nfrom arca_jax import hf\nfrom arca_jax.config import ModelConfig\n"
            f"hf.load_tokenizer(ModelConfig().resolved_path()); hf.load_tokenizer({path!r})\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
