"""Shared test builders (plain functions, imported as ``from fixtures import ...``; tests/conftest.py
puts tests/ on sys.path):

- paths: ``TESTS``, ``REPO``;
- our own tiny models: ``tiny_config``, ``random_params``, ``random_adapter``, ``shifted_adapter``;
- random tiny Qwen3 models made with transformers (PyTorch, CPU), the parity oracle:
  ``tiny_hf_config``, ``tiny_moe_hf_config`` (mixture of experts), ``random_hf_model``,
  ``random_checkpoint``, ``random_peft_model``, ``left_padded_batch``, ``positions_of``,
  ``hf_forward``, ``rel_err``;
- the GRPO oracles' shared case, a PEFT model beside its JAX copy and a ragged batch:
  ``LORA_TARGETS``, ``lora_block``, ``peft_adapter_tree``, ``PeftCase``, ``peft_case``;
- run directories: ``TIMING``, ``read_jsonl``, ``write_jsonl``;
- the test tiers: ``slow_except``.

Every builder is deterministic in its arguments (seeds, scales, shapes), so a test that calls one
computes exactly what it computed when it built the object itself. The jax builders are pure
(traceable): a test may call them inside its own ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))


def slow_except(cases, keep: int = 0, unpack: bool = False) -> list:
    """``pytest.mark.parametrize`` values: ``cases[keep]`` runs in ``make test``, every other case
    only in ``make test-all`` (marked slow). ``unpack``: each case holds the values of several
    argnames (a tuple), not one value."""
    import pytest

    return [case if i == keep else
            pytest.param(*(case if unpack else (case,)), marks=pytest.mark.slow)
            for i, case in enumerate(cases)]

REPO = os.path.dirname(TESTS)

# Wall-clock fields of metrics.jsonl rows: the only ones that differ between equal runs.
TIMING = {"time_sample_s", "time_score_s", "time_update_s", "step_time_s", "tokens_per_s",
          "sample_tokens_per_s"}

# Bound on work that must finish (hostile rewards, linear-time parsers): a check against hangs,
# catastrophic backtracking and quadratic scans, which on these inputs take hours, not a speed
# claim; far above what a loaded 2-core machine needs (a 5 s bound once failed there at 6 s).
FINISHES_S = 60.0


# ------------------------------------ our tiny models -----------------------------------------


def tiny_config(**overrides):
    """A tiny ``qwen3.Qwen3Config``: vocab 61, hidden 32, MLP 48, 2 layers, 4 query heads over 2 KV
    heads of 8, untied embeddings; any field overridden by keyword."""
    from arca_jax import qwen3

    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return qwen3.Qwen3Config(**fields)


def random_params(config, seed: int = 0, scale: float = 1.0):
    """``qwen3.init_params(config, PRNGKey(seed))`` with every matrix (ndim > 1) times `scale`
    (peakier logits); vectors (norm weights) untouched."""
    import jax

    from arca_jax import qwen3

    params = qwen3.init_params(config, jax.random.PRNGKey(seed))
    if scale == 1.0:
        return params
    return jax.tree_util.tree_map(lambda x: x * scale if x.ndim > 1 else x, params)


def grad_recorder():
    """An optax transformation: SGD with learning rate 1 whose state is the last gradient (read
    back exactly), to compare gradients through a full train step."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(
        lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
        lambda g, state, params=None: (jax.tree_util.tree_map(jnp.negative, g), g))


def ragged_batch(vocab: int, B: int = 16, T: int = 10, seed: int = 0):
    """A GRPO ``Batch`` [B, T]: random tokens, 4 prompt tokens, then 1-5 completion tokens per row
    and padding after them; advantages ~ N(0, 1)."""
    import jax.numpy as jnp

    from arca_jax.batch import Batch

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b in range(B):
        n = int(rng.integers(1, 6))
        cm[b, 4:4 + n] = 1
        am[b, 4 + n:] = 0
    adv = rng.normal(size=B).astype(np.float32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                 completion_mask=jnp.asarray(cm), advantages=jnp.asarray(adv))


def _path_length_key(path) -> int:
    return len(str(path))


def random_adapter(config, lora_config, seed: int = 1, scale: float = 0.2, *,
                   path_key=_path_length_key):
    """``lora.init_lora(config, lora_config, PRNGKey(seed))`` with every B replaced by
    ``scale * normal(PRNGKey(path_key(path)))`` (a fresh adapter has B = 0: the identity); A as
    initialised. `path_key` maps a leaf's tree path to its key (default: the length of its str)."""
    import jax

    from arca_jax import lora

    tree = lora.init_lora(config, lora_config, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: scale * jax.random.normal(jax.random.PRNGKey(path_key(p)), x.shape)
        if "lora_b" in str(p) else x, tree)


def shifted_adapter(config, lora_config, seed: int, shift: float):
    """``lora.init_lora(config, lora_config, PRNGKey(seed))`` with `shift` added to every leaf
    (A and B): a non-identity adapter without drawing new numbers."""
    import jax

    from arca_jax import lora

    return jax.tree_util.tree_map(lambda x: x + shift,
                                  lora.init_lora(config, lora_config, jax.random.PRNGKey(seed)))


# ------------------------------ transformers models (the oracle) ------------------------------


def tiny_hf_config(*, hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=97,
                   intermediate=48, tied=True, theta=10000.0):
    """A tiny ``transformers.Qwen3Config`` (eager attention)."""
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=tied, attn_implementation="eager")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def tiny_moe_hf_config(*, experts=4, top_k=2, norm_topk=True, mlp_only=(), sparse_step=1,
                       hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=97,
                       intermediate=48, expert_intermediate=24, tied=False, theta=10000.0):
    """A tiny ``transformers.Qwen3MoeConfig`` (eager attention): `experts` experts of width
    `expert_intermediate`, `top_k` routed per token, dense layers `mlp_only` (MLP width
    `intermediate`) and per `sparse_step`."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        moe_intermediate_size=expert_intermediate, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk, mlp_only_layers=list(mlp_only), decoder_sparse_step=sparse_step,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=tied, attn_implementation="eager")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def random_hf_model(cfg, seed: int = 0):
    """A float32 ``transformers.Qwen3ForCausalLM`` (``Qwen3MoeForCausalLM`` for a qwen3_moe
    config) with every weight random, norm weights included (not all ones)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = (transformers.Qwen3MoeForCausalLM if cfg.model_type == "qwen3_moe"
           else transformers.Qwen3ForCausalLM)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def random_checkpoint(cfg, seed: int, path):
    """``random_hf_model(cfg, seed)`` saved as safetensors under `path` and loaded back with
    ``hf.load_pretrained(path, dtype=float32)``: (transformers model, Qwen3Config, params)."""
    import jax.numpy as jnp

    from arca_jax import hf

    model = random_hf_model(cfg, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    return model, config, params


def random_peft_model(model, *, r, alpha, targets, seed: int, scale: float = 0.3):
    """``peft.get_peft_model(model, ...)`` (no dropout, torch seeded with `seed` before the
    adapter is made) with every lora_B replaced by ``scale * randn`` so that the adapter visibly
    moves the output; in eval mode."""
    import peft
    import torch

    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    lora_dropout=0.0, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn_like(p))
    return pm.eval()


def left_padded_batch(vocab: int, lengths, total: int, seed: int = 0):
    """input_ids, attention_mask [B, total] int64 numpy, rows left-padded to `total`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for b, n in enumerate(lengths):
        ids[b, total - n:] = rng.integers(1, vocab, n)
        mask[b, total - n:] = 1
    return ids, mask


def frequent_token(params, config, ids, mask, *, new: int, **gen) -> int:
    """The token a sampled generation (PRNGKey(3), `sampling.generate` keywords `gen`) of the
    prompts [B, P] holds most often: as end-of-sequence token it makes rows end at different
    steps whatever the random model (a real GRPO batch), which a fixed id does not."""
    import jax

    from arca_jax import sampling

    probe = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(3),
                              max_new_tokens=new, **gen)
    return int(np.bincount(np.asarray(probe.tokens).ravel(), minlength=config.vocab_size).argmax())


def grouped_rollout(config, lora_config, lengths, group: int, new: int, *, prompt_seed: int = 0,
                    **sampled):
    """(params, ids, mask, `sampling.generate` keywords) of a GRPO-like rollout: random params
    (scale 2, peaky logits) and adapter, one left-padded prompt of each length in `lengths`
    (width 7) repeated `group` times, `new` tokens, EOS the token a `sampled` generation holds
    most often (rows end at different steps)."""
    from arca_jax import prompts

    params = random_params(config, seed=0, scale=2.0)
    tree = random_adapter(config, lora_config, seed=1, scale=0.2)
    ids, mask = left_padded_batch(config.vocab_size, lengths, 7, seed=prompt_seed)
    ids, mask = prompts.repeat_groups(ids, mask, group)
    adapter = dict(lora=tree, lora_scale=lora_config.scaling)
    eos = frequent_token(params, config, ids, mask, new=new, **adapter, **sampled)
    return params, ids, mask, dict(config=config, max_new_tokens=new, eos_id=eos, **adapter)


def assert_same_rows(got, want, atol: float = 1e-5):
    """Two `sampling.SampleOutput`s of the same rows: equal tokens, masks, lengths, finished
    flags and step counts; log-probs within `atol`."""
    for name in ("tokens", "mask", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                      np.asarray(getattr(want, name)), err_msg=name)
    for name in ("logps", "sampled_logps"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)),
                                   np.asarray(getattr(want, name)), atol=atol, err_msg=name)
    assert int(got.num_steps) == int(want.num_steps)


def positions_of(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_forward(model, ids, mask):
    """(logits [B, T, V], final hidden [B, T, D]) as float32 numpy, positions = cumsum(mask) - 1."""
    import torch

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


# ------------------------------ the GRPO oracles' shared case ---------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_block(proj: str) -> str:
    """The decoder-layer block holding a projection: "self_attn" or "mlp"."""
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def peft_adapter_tree(pm, targets=LORA_TARGETS):
    """A PEFT model's adapter as our LoRA tree: {"layers": {block: {proj: {"lora_a": [L, in, r],
    "lora_b": [L, r, out]}}}} float32 (PEFT's [r, in] / [out, r] weights transposed), L the
    decoder layers."""
    import jax
    import jax.numpy as jnp

    tree = {}
    for layer in pm.base_model.model.model.layers:
        for proj in targets:
            block = lora_block(proj)
            mod = getattr(getattr(layer, block), proj)
            leaf = tree.setdefault("layers", {}).setdefault(block, {}).setdefault(
                proj, {"lora_a": [], "lora_b": []})
            leaf["lora_a"].append(mod.lora_A["default"].weight.detach().numpy().T)
            leaf["lora_b"].append(mod.lora_B["default"].weight.detach().numpy().T)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.stack(x)), tree,
                                  is_leaf=lambda x: isinstance(x, list))


@dataclasses.dataclass(frozen=True)
class PeftCase:
    """A random tiny Qwen3 (transformers) with a random PEFT adapter on `LORA_TARGETS`, the same
    model and adapter as ours, and a ragged batch of B = 5 rows of T = 14 tokens: left-padded
    prompts in [0, 6), completions from 6, right-padded.

    pm: the PEFT model; config, params: ours (float32); tree: the adapter (`peft_adapter_tree`);
    ids, attention_mask, completion_mask: [B, T] int64 numpy (ids 0 on padding);
    advantages: [B] float32 numpy."""

    pm: Any
    config: Any
    params: Any
    tree: Any
    ids: np.ndarray
    attention_mask: np.ndarray
    completion_mask: np.ndarray
    advantages: np.ndarray


def peft_case(*, layers: int, seed: int, path, r: int, alpha: float) -> PeftCase:
    """The `PeftCase` of a model with `layers` decoder layers (hidden 32, 4 heads, 2 KV heads,
    head_dim 16, vocab 97, untied) drawn with `seed` and saved under `path`; the adapter of rank
    `r` and `alpha` drawn with seed 5 (lora_B scale 0.3); the batch from numpy seed 0."""
    cfg = tiny_hf_config(hidden=32, heads=4, kv_heads=2, head_dim=16, layers=layers, vocab=97,
                         tied=False)
    model, config, params = random_checkpoint(cfg, seed=seed, path=path)
    pm = random_peft_model(model, r=r, alpha=alpha, targets=list(LORA_TARGETS), seed=5,
                           scale=0.3)
    return PeftCase(pm, config, params, peft_adapter_tree(pm), *completion_batch(cfg.vocab_size))


def completion_batch(vocab: int, seed: int = 0):
    """(ids, attention_mask, completion_mask, advantages) of 5 rows x 14 tokens: left-padded
    prompts in [0, 6), completions from 6, right-padded; ids 0 outside the attention mask."""
    B, T, P = 5, 14, 6
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T))
    am = np.zeros((B, T), np.int64)
    cm = np.zeros((B, T), np.int64)
    for b, (plen, clen) in enumerate([(6, 8), (4, 5), (3, 1), (5, 3), (2, 7)]):
        am[b, P - plen:P + clen] = 1
        cm[b, P:P + clen] = 1
    ids = np.where(am == 1, ids, 0)
    adv = rng.normal(size=B).astype(np.float32)
    return ids, am, cm, adv


def hf_greedy(model, ids, mask, n: int, eos, pad: int = 0) -> np.ndarray:
    """transformers' greedy `generate` of n tokens after [B, P] left-padded prompts: [B, n],
    `pad` after a row's EOS and after the loop stopped early (every row ended)."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos,
                             pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=pad)


# ------------------------------------ run directories -----------------------------------------


def trees_close(a, b, tol: float = 1e-5):
    """Asserts per leaf of two pytrees of one structure: NaN at the same places (e.g. a metric
    that is not defined for the batch), elsewhere ||a - b||_2 <= tol * max(1, ||b||_2)."""
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        assert np.array_equal(np.isnan(x), np.isnan(y)), (x, y)
        x, y = np.nan_to_num(x), np.nan_to_num(y)
        assert np.linalg.norm(x - y) <= tol * max(1.0, np.linalg.norm(y)), (x, y)


def read_jsonl(path) -> list:
    """Every line of a JSON-lines file, parsed."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records, *, trailing_newline: bool = False):
    """`records` one JSON object a line into `path` (a pathlib.Path), UTF-8; an empty line at
    the end with `trailing_newline`. Returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records)
                    + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def prefill_and_decode(weights, config, ids, mask, feed, slots: int):
    """`qwen3.inference_forward` over left-padded prompts ids [B, P] (mask [B, P]), then one
    decode step per column of feed [B, steps], in a cache of `slots`: (the logits of every call
    [steps + 1, B, V] as numpy, the final cache)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from arca_jax import qwen3

    B = ids.shape[0]
    step = jax.jit(qwen3.inference_forward, static_argnames="config")
    out = step(weights, ids, config=config, positions=qwen3.default_positions(mask),
               attention_mask=mask, cache=qwen3.KVCache.init(
                   config, B, slots, transposed_keys=qwen3.transposed_keys(
                       weights.decode_attention)))
    seen = [out.logits]
    for i in range(feed.shape[1]):
        out = step(weights, jnp.asarray(feed[:, i:i + 1]), config=config,
                   positions=(mask.sum(1, keepdims=True) + i).astype(jnp.int32),
                   attention_mask=jnp.ones((B, 1), jnp.int32), cache=out.cache)
        seen.append(out.logits)
    return np.stack(seen), out.cache
