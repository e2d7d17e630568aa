"""Random tiny Qwen3 models made with transformers (PyTorch, CPU), the parity oracle of the tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def tiny_hf_config(*, hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=97,
                   intermediate=48, tied=True, theta=10000.0) -> transformers.Qwen3Config:
    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=tied, attn_implementation="eager")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def random_hf_model(cfg: transformers.Qwen3Config, seed: int = 0) -> transformers.Qwen3ForCausalLM:
    """A float32 model with every weight random, norm weights included (not all ones)."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def left_padded_batch(vocab: int, lengths, total: int, seed: int = 0):
    """input_ids, attention_mask [B, total] int64 numpy, rows left-padded to `total`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for b, n in enumerate(lengths):
        ids[b, total - n:] = rng.integers(1, vocab, n)
        mask[b, total - n:] = 1
    return ids, mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_forward(model, ids, mask):
    """(logits [B, T, V], final hidden [B, T, D]) as float32 numpy, positions = cumsum(mask) - 1."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions_of(mask)), output_hidden_states=True)
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def rel_err(a, b, mask=None) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        m = np.asarray(mask, bool)
        a, b = a[m], b[m]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
