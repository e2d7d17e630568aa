"""The character-level tokenizer: Hugging Face files, AutoTokenizer loading, exact round trips."""
import json

import pytest
from transformers import AutoTokenizer

from arca_jax.tasks import arithmetic, tokenizer
from arca_jax.tasks.data import ARITHMETIC_PROMPT_TEMPLATE


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("char_tok")
    tokenizer.save_char_tokenizer(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / name).is_file()
    assert json.loads((d / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    return AutoTokenizer.from_pretrained(str(d))


def test_special_tokens_and_vocab(tok):
    assert len(tok) == tokenizer.VOCAB_SIZE == 99
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids("\n") == 3
    assert tok.convert_tokens_to_ids(" ") == 4 and tok.convert_tokens_to_ids("~") == 98
    assert tok("ab")["input_ids"] == [tokenizer.VOCAB["a"], tokenizer.VOCAB["b"]]  # nothing added


def test_round_trip(tok):
    texts = [tokenizer.CHARS, "  two  spaces , . ? !  ", "\\boxed{\\frac{1}{2}}\n\n$x^2$"]
    for ex in arithmetic.generate("test", 200):
        texts.append(ARITHMETIC_PROMPT_TEMPLATE.format(problem=ex.problem) + ex.solution)
    for s in texts:
        ids = tok(s)["input_ids"]
        assert len(ids) == len(s)  # one token per character
        assert tok.decode(ids) == s
        assert tokenizer.build_char_tokenizer().decode(ids, skip_special_tokens=False) == s


def test_eos_unknown_and_padding(tok):
    ids = tok("1+1")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids) == "1+1<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "1+1"
    assert tok("a\tb\u00e9")["input_ids"] == [tokenizer.VOCAB["a"], 2, tokenizer.VOCAB["b"], 2]
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][2:] == [0, 0] and batch["attention_mask"][0] == [1, 1, 0, 0]
