"""Qwen3 decoder in Flax linen, exposed as the pure function `forward(params, ...)`.

Dimension letters (used in every einsum, shape comment and sharding spec of the project):
B batch, T query time, S key time (cache slots), D model width, F MLP width, N query heads,
K key/value heads, G query heads per KV head (N = K * G), H head width, V vocabulary, L layers,
R LoRA rank.

Parameter tree (plain nested dict; per-layer leaves are stacked on a leading L axis and the layers
run under `nn.scan`, so compile time does not grow with depth). Kernels are stored [in, out]:

    embed_tokens/embedding                  [V, D]
    layers/input_layernorm/scale            [L, D]
    layers/self_attn/{q,k,v}_proj/kernel    [L, D, N*H] / [L, D, K*H] / [L, D, K*H]
    layers/self_attn/o_proj/kernel          [L, N*H, D]
    layers/self_attn/{q,k}_norm/scale       [L, H]
    layers/post_attention_layernorm/scale   [L, D]
    layers/mlp/{gate,up}_proj/kernel        [L, D, F]
    layers/mlp/down_proj/kernel             [L, F, D]
    norm/scale                              [D]
    lm_head/kernel                          [D, V]   (absent when tie_word_embeddings)

The LoRA tree (see `arca_jax.lora`) mirrors the projections: `layers/<block>/<proj>/{lora_a [L, in, R],
lora_b [L, R, out]}`. It is passed as a separate Flax collection, so `jax.grad` with respect to it
sees only the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import flax.core
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Params = Mapping[str, Any]

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
PROJ_BLOCK = {**{p: "self_attn" for p in ATTN_PROJS}, **{p: "mlp" for p in MLP_PROJS}}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A model configuration that this port cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 shapes and constants, with transformers' field names. Hashable: static under jit."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"Qwen3Config.{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def num_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, source: Any) -> "Qwen3Config":
        """Builds a config from a transformers `Qwen3Config`, a dict, or a config.json path (file or dir).

        Reads both config.json layouts: a top-level `rope_theta` (+ optional `rope_scaling`, written
        by transformers 4.x, as on the Hub) and `rope_parameters: {rope_type, rope_theta}` (5.x).
        Refuses what the port does not implement (rope scaling, sliding windows, attention biases,
        another activation) with `ConfigError`.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path) as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        elif isinstance(source, Mapping):
            d = dict(source)
        elif hasattr(source, "to_dict"):
            d = source.to_dict()
        else:
            raise TypeError(f"from_hf takes a transformers config, a dict or a path, got {type(source)}")

        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ConfigError(f"model_type is {model_type!r}, expected 'qwen3'")
        rope_theta = _read_rope_theta(d)
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=True is not implemented by this port")
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=True is not implemented by this port (Qwen3 has none)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not implemented (Qwen3 uses 'silu')")
        heads = d.get("num_attention_heads", cls.num_attention_heads)
        hidden = d.get("hidden_size", cls.hidden_size)
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads

        def tok(name):
            v = d.get(name)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            return v

        return cls(
            vocab_size=d.get("vocab_size", cls.vocab_size),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", cls.intermediate_size),
            num_hidden_layers=d.get("num_hidden_layers", cls.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", cls.rms_norm_eps)),
            rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", cls.max_position_embeddings),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=tok("bos_token_id"),
            eos_token_id=tok("eos_token_id"),
            pad_token_id=tok("pad_token_id"),
        )

    def to_hf(self):
        """The equivalent `transformers.Qwen3Config`."""
        import transformers

        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        theta = kw.pop("rope_theta")
        cfg = transformers.Qwen3Config(**kw)
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        else:  # transformers 4.x
            cfg.rope_theta = theta
        return cfg

    def to_dict(self) -> dict:
        """config.json contents; carries both rope layouts so either transformers major reads it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
                 attention_bias=False, use_sliding_window=False,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d


def _read_rope_theta(d: Mapping[str, Any]) -> float:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for block in (params, scaling):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise ConfigError(f"rope parameters must be a mapping, got {block!r}")
        if "full_attention" in block or "sliding_attention" in block:
            raise ConfigError("per-layer-type rope parameters are not implemented by this port")
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"rope scaling type {kind!r} is not implemented by this port (only 'default'); "
                "refusing rather than silently running un-scaled rotary embeddings")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return params["rope_theta"]
    if "rope_theta" in d:
        return d["rope_theta"]
    return 10000.0  # transformers' default_theta


_PRESETS = {
    "Qwen3-0.6B": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, max_position_embeddings=32768),
    "Qwen3-1.7B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, max_position_embeddings=32768),
    "Qwen3-4B": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=True, max_position_embeddings=32768),
    "Qwen3-8B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=False, max_position_embeddings=32768),
}


def preset(name: str) -> Qwen3Config:
    """Shapes of a released Qwen3 model ("Qwen3-1.7B"; a "-Base" suffix or "Qwen/" prefix is accepted)."""
    key = name.split("/")[-1].removesuffix("-Base")
    if key not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
    return Qwen3Config(rms_norm_eps=1e-6, rope_theta=1_000_000.0, eos_token_id=151643,
                       bos_token_id=151643, **_PRESETS[key])


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value buffers for all layers plus the next write slot. Returned, never mutated.

    k, v:  [L, B, S, K, H] in the model's dtype.
    valid: [B, S] bool, slots holding a real (non-padding) token.
    index: [] int32, the slot the next token is written to (shared by all rows: prompts are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, size, config.num_key_value_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, V] float32 (None when not asked for); hidden [B, T, D] after the final norm."""

    logits: Optional[jax.Array]
    hidden: jax.Array
    cache: Optional[KVCache] = None


@flax.struct.dataclass
class _Context:
    """Per-call arrays shared (broadcast) by every layer."""

    cos: jax.Array  # [B, T, H] float32
    sin: jax.Array  # [B, T, H] float32
    visible: jax.Array  # [B, T, S] bool: query t may attend to key slot s
    write_index: Optional[jax.Array]  # [] int32 cache slot of the first query token, or None


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Any = None  # None: the table's dtype

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.initializers.normal(0.02),
                           (self.num_embeddings, self.features), jnp.float32)
        return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)


class RMSNorm(nn.Module):
    """weight * (x / rms(x)), statistics in float32, cast back to x's dtype before the weight (as HF)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class LoraLinear(nn.Module):
    """y = x W (+ lora_scale * dropout(x) A B when the 'lora' collection holds lora_a/lora_b)."""

    features: int
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                            jnp.float32)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
        if self.has_variable("lora", "lora_a"):
            a = self.get_variable("lora", "lora_a")  # [in, R]
            b = self.get_variable("lora", "lora_b")  # [R, out]
            xa = x.astype(a.dtype)
            if self.lora_dropout > 0.0:
                xa = nn.Dropout(self.lora_dropout, deterministic=False)(xa)
            delta = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", xa, a), b)
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return y


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):
    """x [B, T, N, H]; cos, sin [B, T, H] float32 (cast to x's dtype first, as HF)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    config: Qwen3Config
    lora_scale: float
    lora_dropout: float

    @nn.compact
    def __call__(self, x, ctx: _Context, cache: Optional[LayerCache]):
        c = self.config
        B, T, _ = x.shape
        N, K, G, H = c.num_attention_heads, c.num_key_value_heads, c.num_groups, c.head_dim
        proj = lambda n, f: LoraLinear(f, self.lora_scale, self.lora_dropout, name=n)  # noqa: E731
        q = proj("q_proj", N * H)(x).reshape(B, T, N, H)
        k = proj("k_proj", K * H)(x).reshape(B, T, K, H)
        v = proj("v_proj", K * H)(x).reshape(B, T, K, H)
        q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
        k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        q = _apply_rope(q, ctx.cos, ctx.sin)
        k = _apply_rope(k, ctx.cos, ctx.sin)

        if cache is not None:
            zero = jnp.zeros((), jnp.int32)
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype),
                                                 (zero, ctx.write_index, zero, zero))
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype),
                                                 (zero, ctx.write_index, zero, zero))
            new_cache = LayerCache(k=k_all, v=v_all)
            k, v = k_all.astype(x.dtype), v_all.astype(x.dtype)
        else:
            new_cache = None

        q = q.reshape(B, T, K, G, H)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = scores * (H ** -0.5)
        scores = jnp.where(ctx.visible[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N * H)
        return proj("o_proj", c.hidden_size)(out), new_cache


class MLP(nn.Module):
    config: Qwen3Config
    lora_scale: float
    lora_dropout: float

    @nn.compact
    def __call__(self, x):
        c = self.config
        proj = lambda n, f: LoraLinear(f, self.lora_scale, self.lora_dropout, name=n)  # noqa: E731
        h = nn.silu(proj("gate_proj", c.intermediate_size)(x)) * proj("up_proj", c.intermediate_size)(x)
        return proj("down_proj", c.hidden_size)(h)


class DecoderLayer(nn.Module):
    config: Qwen3Config
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, cache: Optional[LayerCache], ctx: _Context):
        c = self.config
        h, new_cache = Attention(c, self.lora_scale, self.lora_dropout, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), ctx, cache)
        x = x + h
        x = x + MLP(c, self.lora_scale, self.lora_dropout, name="mlp")(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, new_cache


class Qwen3(nn.Module):
    """The decoder stack. Use `forward`; this module is its implementation."""

    config: Qwen3Config
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    remat: bool = False
    dtype: Any = None  # activation dtype; None: the embedding's dtype

    @nn.compact
    def __call__(self, input_ids, ctx: _Context, cache: Optional[LayerCache]):
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(input_ids)  # [B, T, D]

        layer = DecoderLayer
        if self.remat:
            layer = nn.remat(layer, prevent_cse=False,
                             policy=jax.checkpoint_policies.nothing_saveable)
        layers = nn.scan(layer, variable_axes={"params": 0, "lora": 0},
                         split_rngs={"params": True, "dropout": True},
                         in_axes=(0, nn.broadcast), length=c.num_hidden_layers)
        x, new_cache = layers(c, self.lora_scale, self.lora_dropout, name="layers")(x, cache, ctx)
        return RMSNorm(c.rms_norm_eps, name="norm")(x), new_cache


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1, clipped at 0 for left padding. [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin [B, T, H] float32 for integer positions [B, T] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def lm_head_kernel(params: Params, config: Qwen3Config) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def compute_logits(params: Params, hidden: jax.Array, config: Qwen3Config) -> jax.Array:
    """hidden [..., D] -> logits [..., V], accumulated and returned in float32."""
    w = lm_head_kernel(params, config)
    return jnp.einsum("...D,DV->...V", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def forward(params: Params, input_ids: jax.Array, *, config: Qwen3Config,
            attention_mask: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
            lora: Optional[Params] = None, lora_scale: float = 1.0,
            lora_dropout: float = 0.0, rng: Optional[jax.Array] = None,
            cache: Optional[KVCache] = None, return_logits: bool = True,
            remat: bool = False) -> ModelOutput:
    """Runs the model. Pure: jit it with `config` (and the other Python-valued options) static.

    Args:
      params: base parameter tree (float32 or bfloat16; activations follow the embedding's dtype).
      input_ids: [B, T] int tokens; prompts are left-padded.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (default all ones). Padded keys are
        never attended to; padded query positions produce finite but meaningless outputs.
      positions: [B, T] rotary positions (default `cumsum(attention_mask) - 1`; with a cache the
        caller passes them, continuing each row's count).
      lora: adapter tree from `arca_jax.lora`, or None for the base model.
      lora_scale: multiplier of the adapter update (`LoraConfig.scaling` = alpha / rank).
      lora_dropout: dropout rate on the adapter input (training forward only); needs `rng`.
      cache: a `KVCache`; the T new tokens are written at `cache.index` and attend to all valid
        earlier slots. The updated cache is returned in the output.
      return_logits: compute [B, T, V] float32 logits (skip for chunked log-probs or decoding).
      remat: rematerialise each layer in the backward pass (saves activation memory).

    Returns:
      ModelOutput(logits [B, T, V] float32 or None, hidden [B, T, D] after the final RMSNorm, cache).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        if cache is not None:
            raise ValueError("with a cache, pass `positions` explicitly (each row's running count)")
        positions = default_positions(attention_mask)
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)

    if cache is None:
        causal = jnp.tril(jnp.ones((T, T), bool))
        visible = causal[None] & attention_mask[:, None, :]
        ctx = _Context(cos=cos, sin=sin, visible=visible, write_index=None)
        layer_cache = None
    else:
        S = cache.size
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
        slot = jnp.arange(S)[None, :]
        query_slot = cache.index + jnp.arange(T)[:, None]
        visible = (slot <= query_slot)[None] & valid[:, None, :]
        ctx = _Context(cos=cos, sin=sin, visible=visible, write_index=cache.index)
        layer_cache = LayerCache(k=cache.k, v=cache.v)

    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    rngs = None
    if lora is not None and lora_dropout > 0.0:
        if rng is None:
            raise ValueError("lora_dropout > 0 needs an `rng` key")
        rngs = {"dropout": rng}
    model = Qwen3(config, lora_scale=lora_scale,
                  lora_dropout=lora_dropout if lora is not None else 0.0, remat=remat)
    hidden, new_layer_cache = model.apply(variables, input_ids, ctx, layer_cache, rngs=rngs)

    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=new_layer_cache.k, v=new_layer_cache.v, valid=valid,
                            index=cache.index + T)
    logits = compute_logits(params, hidden, config) if return_logits else None
    return ModelOutput(logits=logits, hidden=hidden, cache=new_cache)


def init_params(config: Qwen3Config, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms) in `dtype`. For tests and benchmarks;
    under `jax.eval_shape` it allocates nothing."""
    ctx = _Context(cos=jnp.zeros((1, 1, config.head_dim)), sin=jnp.zeros((1, 1, config.head_dim)),
                   visible=jnp.ones((1, 1, 1), bool), write_index=None)
    body_rng, head_rng = jax.random.split(rng)
    params = flax.core.unfreeze(
        Qwen3(config).init(body_rng, jnp.zeros((1, 1), jnp.int32), ctx, None)["params"])
    if not config.tie_word_embeddings:  # read by `compute_logits`, outside the module
        params["lm_head"] = {"kernel": 0.02 * jax.random.normal(
            head_rng, (config.hidden_size, config.vocab_size), jnp.float32)}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def param_shapes(config: Qwen3Config, dtype=jnp.float32) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))
