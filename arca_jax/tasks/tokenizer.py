"""A character-level tokenizer for the tiny arithmetic model, in Hugging Face format.

Vocabulary (99 ids, fixed order, so ids never change between builds):
  0 ``<|pad|>``, 1 ``<|endoftext|>`` (eos), 2 ``<|unk|>``, 3 ``"\\n"``, 4..98 the printable ASCII
  characters from space (32) to ``~`` (126). Every character of the arithmetic task and of plain-ASCII
  MATH text has its own id.

Decisions: no bos token and no automatic eos (like Qwen3 base tokenizers: ``encode`` adds nothing);
pad is its own token (not eos), so a padding mask never hides a real end of sequence; a character
outside the vocabulary (tab, non-ASCII) becomes ``<|unk|>`` rather than being dropped silently.
No normaliser and no pre-tokeniser, a ``Fuse`` decoder and ``clean_up_tokenization_spaces=False``,
so ``decode(encode(s)) == s`` for every string of vocabulary characters (spaces included).

Built with ``tokenizers`` (a BPE model without merges is exactly a character lookup) and written as
``tokenizer.json`` + ``tokenizer_config.json`` (tokenizer_class ``PreTrainedTokenizerFast``) +
``special_tokens_map.json``; ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it.
"""
from __future__ import annotations

import json
import os

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
VOCAB_SIZE = len(VOCAB)
PAD_ID, EOS_ID, UNK_ID = VOCAB[PAD_TOKEN], VOCAB[EOS_TOKEN], VOCAB[UNK_TOKEN]
DEFAULT_MODEL_MAX_LENGTH = 256


def build_char_tokenizer():
    """The character-level ``tokenizers.Tokenizer`` (no files written)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token=UNK_TOKEN))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_char_tokenizer(directory: str | os.PathLike, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> str:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``directory``."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    build_char_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    specials = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        **specials,
        "padding_side": "right",
        "added_tokens_decoder": {
            str(VOCAB[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
        f.write("\n")
    return directory


def load_char_tokenizer(directory: str | os.PathLike):
    """The tokenizer as ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it
    (``arca_jax.hf.load_tokenizer``: without importing torch)."""
    from arca_jax import hf

    return hf.load_tokenizer(os.fspath(directory))
