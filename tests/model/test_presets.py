"""The released Qwen3 dense models' presets: every field against the published config.json facts,
and the parameter count of `qwen3.param_shapes` against a formula written out here and against
the totals of the model cards (rounded as the cards print them)."""

import jax
import numpy as np
import pytest

from arca_jax import qwen3

# name: hidden D, MLP width F, layers L, query heads N, tied embeddings; the model cards' total
# and non-embedding parameter counts in billions, as printed there (rounded)
RELEASED = {
    "Qwen3-0.6B": (1024, 3072, 28, 16, True, 0.6, 0.44),
    "Qwen3-1.7B": (2048, 6144, 28, 16, True, 1.7, 1.4),
    "Qwen3-4B": (2560, 9728, 36, 32, True, 4.0, 3.6),
    "Qwen3-8B": (4096, 12288, 36, 32, False, 8.2, 6.95),
    "Qwen3-14B": (5120, 17408, 40, 40, False, 14.8, 13.2),
    "Qwen3-32B": (5120, 25600, 64, 64, False, 32.8, 31.2),
}
V, K, H = 151936, 8, 128  # vocabulary, key/value heads, head width: the same in every model


def formula_count(D, F, L, N, tied):
    """Parameters of a Qwen3 decoder from its shapes, counted by hand."""
    attention = D * N * H + 2 * D * K * H + N * H * D + 2 * H  # q, k, v, o; q_norm, k_norm
    mlp = 3 * D * F  # gate, up, down
    norms = 2 * D  # input and post-attention RMS norms
    embeddings = V * D * (1 if tied else 2)  # embed_tokens (and lm_head when untied)
    return L * (attention + mlp + norms) + D + embeddings  # + the final norm


def shapes_count(config):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(qwen3.param_shapes(config)))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_fields(name):
    D, F, L, N, tied, _, _ = RELEASED[name]
    c = qwen3.preset(name)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.tie_word_embeddings) == (D, F, L, N, tied)
    assert (c.vocab_size, c.num_key_value_heads, c.head_dim) == (V, K, H)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-6, 40960)
    assert qwen3.preset(f"Qwen/{name}-Base") == c


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_parameter_count(name):
    D, F, L, N, tied, total_b, non_embedding_b = RELEASED[name]
    n = shapes_count(qwen3.preset(name))
    assert n == formula_count(D, F, L, N, tied)
    # the model cards round to the digits they print
    digits = len(str(total_b).split(".")[1])
    assert round(n / 1e9, digits) == total_b
    embedding = V * D * (1 if tied else 2)
    digits = len(str(non_embedding_b).split(".")[1])
    assert round((n - embedding) / 1e9, digits) == non_embedding_b


def test_exact_counts():
    """The counts in full, for the record (0.6B includes its tied embedding once)."""
    assert shapes_count(qwen3.preset("Qwen3-0.6B")) == 596_049_920
    assert shapes_count(qwen3.preset("Qwen3-8B")) == 8_190_735_360
    assert shapes_count(qwen3.preset("Qwen3-14B")) == 14_768_307_200
    assert shapes_count(qwen3.preset("Qwen3-32B")) == 32_762_123_264


def test_unknown_preset():
    with pytest.raises(KeyError, match="Qwen3-14B"):
        qwen3.preset("Qwen3-3B")
