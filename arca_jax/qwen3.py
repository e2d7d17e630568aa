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
from jax.ad_checkpoint import checkpoint_name

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

    The sampler uses the faster `inference_forward` and its `InferenceCache` instead (see below).
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
    visible: Optional[jax.Array]  # [B, T, S] bool: query t may attend to key slot s ("einsum")
    write_index: Optional[jax.Array]  # [] int32 cache slot of the first query token, or None
    # "cudnn" / "sdpa-xla" only: [B] int32 tokens per row; each row's tokens occupy slots
    # [0, lengths) (`forward` rotates the rows so), attention is causal within them.
    lengths: Optional[jax.Array] = None
    attention: str = flax.struct.field(pytree_node=False, default="einsum")


# --------------------------------------------------------------------------------------------
# Execution options of the training forward (static)
# --------------------------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "einsum", "cudnn", "sdpa-xla")
REMAT_OPTIONS = (False, True, "full", "projections")
# Names of the values that remat="projections" keeps for the backward pass (`checkpoint_name`).
_SAVED_NAMES = ("proj_out", "lora_xa", "attn_out")


def on_cuda(min_capability: float = 0.0) -> bool:
    """True when the default backend is an NVIDIA GPU (cuDNN available) of at least this compute
    capability (cuDNN flash attention needs 8.0, Ampere)."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    try:
        if "rocm" in device.client.platform_version.lower():
            return False
    except Exception:  # noqa: BLE001 - an unknown client: assume CUDA, as jax's "gpu" usually is
        pass
    try:
        return float(device.compute_capability) >= min_capability
    except Exception:  # noqa: BLE001 - no compute capability reported
        return min_capability == 0.0


def resolve_attention(attention: str, dtype, cached: bool) -> str:
    """The attention implementation `forward` runs.

    "einsum": scores and softmax as explicit XLA ops over [B, K, G, T, S] (any mask; the cache
        path always uses it). "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`,
        cuDNN's fused flash attention (bf16/fp16 on NVIDIA GPUs), causal within each row's run of
        real tokens. "sdpa-xla": the same call and row layout with jax's XLA implementation (any
        backend and dtype; checks the "cudnn" plumbing on CPU). "auto": "cudnn" on a CUDA GPU of
        compute capability >= 8.0 with bf16/fp16 activations and no cache, else "einsum".
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention {attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if cached:
        return "einsum"
    if attention == "auto":
        fused = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if fused and on_cuda(8.0) else "einsum"
    return attention


def remat_policy(remat):
    """The `jax.checkpoint` policy of a `remat` option, or None for no rematerialisation.

    True / "full": keep only each layer's input (recompute the whole layer in the backward pass).
    "projections": also keep every projection's output (LoRA update included), the adapters'
    x A and the attention output; the backward pass recomputes only norms, rotary embeddings,
    activations and the attention kernel's statistics (no projection matmul runs twice).
    """
    if remat is False or remat is None:
        return None
    if remat is True or remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "projections":
        return jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES)
    raise ValueError(f"remat {remat!r}; valid: {REMAT_OPTIONS}")


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
    """y = x W (+ lora_scale * dropout(x) A B when the 'lora' collection holds lora_a/lora_b).

    lora_dtype: dtype of the adapter matmuls. None: the activation dtype (x's): with bf16
    activations and float32 adapters, A and B are cast to bf16 for the matmuls (float32 master
    weights; their gradients come back float32 through the cast). Float32 activations compute in
    float32 exactly as before. "float32" forces float32 adapter matmuls under bf16 activations.
    """

    features: int
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                            jnp.float32)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
        if self.has_variable("lora", "lora_a"):
            a = self.get_variable("lora", "lora_a")  # [in, R]
            b = self.get_variable("lora", "lora_b")  # [R, out]
            dtype = x.dtype if self.lora_dtype is None else jnp.dtype(self.lora_dtype)
            xa = x.astype(dtype)
            if self.lora_dropout > 0.0:
                xa = nn.Dropout(self.lora_dropout, deterministic=False)(xa)
            xa = checkpoint_name(jnp.einsum("...i,ir->...r", xa, a.astype(dtype)), "lora_xa")
            delta = jnp.einsum("...r,ro->...o", xa, b.astype(dtype))
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return checkpoint_name(y, "proj_out")


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):
    """x [B, T, N, H]; cos, sin [B, T, H] float32 (cast to x's dtype first, as HF)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


def _fused_attention(q, k, v, lengths, implementation: str):
    """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] within each row's first
    `lengths` [B] slots (`jax.nn.dot_product_attention`, cuDNN flash attention or jax's XLA
    version). Slots at or after a row's length are zeros in and out, so whatever a kernel leaves
    there (values or gradients) never reaches the rest of the model."""
    T, H = q.shape[1], q.shape[-1]
    rows = (jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None])[:, :, None, None]
    q, k, v = (jnp.where(rows, t, jnp.zeros((), t.dtype)) for t in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, scale=H ** -0.5, is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation="cudnn" if implementation == "cudnn" else "xla")
    return jnp.where(rows, out, jnp.zeros((), out.dtype))


class Attention(nn.Module):
    config: Qwen3Config
    lora_scale: float
    lora_dropout: float
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x, ctx: _Context, cache: Optional[LayerCache]):
        c = self.config
        B, T, _ = x.shape
        N, K, G, H = c.num_attention_heads, c.num_key_value_heads, c.num_groups, c.head_dim
        proj = lambda n, f: LoraLinear(f, self.lora_scale, self.lora_dropout, self.lora_dtype,  # noqa: E731
                                       name=n)
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

        if cache is None and ctx.attention != "einsum":
            out = _fused_attention(q, k, v, ctx.lengths, ctx.attention).reshape(B, T, N * H)
        else:
            q = q.reshape(B, T, K, G, H)
            scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
            scores = scores * (H ** -0.5)
            scores = jnp.where(ctx.visible[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
            out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N * H)
        out = checkpoint_name(out, "attn_out")
        return proj("o_proj", c.hidden_size)(out), new_cache


class MLP(nn.Module):
    config: Qwen3Config
    lora_scale: float
    lora_dropout: float
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        proj = lambda n, f: LoraLinear(f, self.lora_scale, self.lora_dropout, self.lora_dtype,  # noqa: E731
                                       name=n)
        h = nn.silu(proj("gate_proj", c.intermediate_size)(x)) * proj("up_proj", c.intermediate_size)(x)
        return proj("down_proj", c.hidden_size)(h)


class DecoderLayer(nn.Module):
    config: Qwen3Config
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x, cache: Optional[LayerCache], ctx: _Context):
        c = self.config
        h, new_cache = Attention(c, self.lora_scale, self.lora_dropout, self.lora_dtype,
                                 name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), ctx, cache)
        x = x + h
        x = x + MLP(c, self.lora_scale, self.lora_dropout, self.lora_dtype, name="mlp")(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, new_cache


class Qwen3(nn.Module):
    """The decoder stack. Use `forward`; this module is its implementation."""

    config: Qwen3Config
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    remat: Any = False  # see `remat_policy`
    dtype: Any = None  # activation dtype; None: the embedding's dtype
    lora_dtype: Any = None  # see `LoraLinear`

    @nn.compact
    def __call__(self, input_ids, ctx: _Context, cache: Optional[LayerCache]):
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(input_ids)  # [B, T, D]

        layer = DecoderLayer
        policy = remat_policy(self.remat)
        if policy is not None:
            layer = nn.remat(layer, prevent_cse=False, policy=policy)
        layers = nn.scan(layer, variable_axes={"params": 0, "lora": 0},
                         split_rngs={"params": True, "dropout": True},
                         in_axes=(0, nn.broadcast), length=c.num_hidden_layers)
        x, new_cache = layers(c, self.lora_scale, self.lora_dropout, self.lora_dtype,
                              name="layers")(x, cache, ctx)
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
            remat: Any = False, attention: str = "auto", lora_dtype: Any = None) -> ModelOutput:
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
      remat: rematerialise each layer in the backward pass (saves activation memory): False,
        True (= "full") or "projections" (see `remat_policy`).
      attention: "auto" (default), "einsum", "cudnn" or "sdpa-xla" (see `resolve_attention`;
        "auto" is cuDNN flash attention on a CUDA GPU with bf16 activations, else "einsum").
        "cudnn" and "sdpa-xla" need each row's attention_mask to be one run of ones (left
        padding, right padding, or both: what the sampler's batches are); the rows are rotated so
        that their tokens start at slot 0, attention runs causally over that run, and the hidden
        states are rotated back. A row with a hole in its mask gets NaN hidden states there
        (never silently wrong values): use "einsum" for such masks. Values equal "einsum" up to
        float rounding; dropout masks are drawn in the rotated layout (same distribution,
        different draw).
      lora_dtype: dtype of the adapter matmuls; None: the activation dtype (see `LoraLinear`).

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
    act_dtype = params["embed_tokens"]["embedding"].dtype
    impl = resolve_attention(attention, act_dtype, cached=cache is not None)
    remat_policy(remat)  # validates
    rotated = impl != "einsum"
    if rotated:  # rows rotated left so that each row's tokens occupy slots [0, n)
        slot = jnp.arange(T, dtype=jnp.int32)[None, :]
        first = jnp.argmax(attention_mask, axis=1).astype(jnp.int32)[:, None]  # 0 for empty rows
        lengths = jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
        src = (slot + first) % T  # rotated slot i holds position src[b, i]
        input_ids = jnp.take_along_axis(input_ids, src, axis=1)
        positions = jnp.take_along_axis(positions, src, axis=1)
        one_run = jnp.all(jnp.take_along_axis(attention_mask, src, axis=1)
                          == (slot < lengths[:, None]), axis=1)  # [B]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)

    if cache is None and rotated:
        ctx = _Context(cos=cos, sin=sin, visible=None, write_index=None,
                       lengths=jnp.maximum(lengths, 1), attention=impl)
        layer_cache = None
    elif cache is None:
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
                  lora_dropout=lora_dropout if lora is not None else 0.0, remat=remat,
                  lora_dtype=lora_dtype)
    hidden, new_layer_cache = model.apply(variables, input_ids, ctx, layer_cache, rngs=rngs)
    if rotated:  # back to the caller's layout; rows whose mask is not one run: NaN
        back = (jnp.arange(T, dtype=jnp.int32)[None, :] - first) % T
        hidden = jnp.take_along_axis(hidden, back[:, :, None], axis=1)
        hidden = jnp.where(one_run[:, None, None], hidden, jnp.asarray(jnp.nan, hidden.dtype))

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


# --------------------------------------------------------------------------------------------
# Inference path: fused projections, per-layer KV buffers, logits at the last position only
# --------------------------------------------------------------------------------------------
#
# The sampler (`arca_jax.sampling`) runs the model hundreds of times per batch at T = 1, where a
# step's cost is the number of kernels it launches (CPU; GPU launch gaps) and the bytes it reads
# (GPU), not its arithmetic. `inference_forward` computes the same function as `forward` (the tests
# hold the two to 1e-4 in float32) with fewer, larger operations:
#   - q/k/v share one [D, (N+2K)H] matmul and gate/up one [D, 2F] matmul (concatenated once per
#     `inference_weights` call, outside the decode loop; the parameter tree is untouched);
#   - each RMSNorm weight before a projection is folded into the kernel's rows, diag(w) W, and the
#     per-row 1/rms multiplies the matmul's output: no normalised copy of x is written;
#   - q_norm and k_norm run as one normalisation over the N + K heads, with rotary in the same pass;
#   - a LoRA adapter is either merged into those kernels (one matmul per projection group) or kept
#     as one low-rank pair per group: A's side by side, B's block-diagonal, `lora_scale` folded in;
#   - layers are unrolled over per-layer weight and cache arrays, so a step never slices a stacked
#     [L, ...] array (on GPU such a dynamic slice feeding a matmul is a copy of the operand);
#   - the cache is [B, K, S, H] per layer, written in place (dynamic_update_slice on the loop
#     carry) and read in that layout, the padding mask is one additive bias per call;
#   - the final norm and the head run on the last position only.
#
# Measured on the CPU benchmark model (experiments/NOTES_sampling.md): one decode step of the
# sampler went from 406 kernels (linen forward, stacked cache, threefry per step) to 110.


@flax.struct.dataclass
class LowRank:
    """A low-rank update x -> (x a) b of one projection group, `lora_scale` already folded into b.

    a: [in, R'] (the group's A matrices side by side), b: [R', out] (their B's, block-diagonal).
    """

    a: jax.Array
    b: jax.Array


@flax.struct.dataclass
class InferenceLayer:
    """One decoder layer's weights for `inference_forward` (no leading L axis).

    The kernels after a norm (qkv, gate_up, and their LoRA `a`) have that norm's weight folded into
    their rows: qkv = diag(input_layernorm) [Wq | Wk | Wv].
    """

    qkv: jax.Array  # [D, (N+2K)*H]
    qk_norm: jax.Array  # [N+K, H]: q_norm's weight for each query head, then k_norm's per KV head
    o: jax.Array  # [N*H, D]
    gate_up: jax.Array  # [D, 2F]: diag(post_attention_layernorm) [W_gate | W_up]
    down: jax.Array  # [F, D]
    qkv_lora: Optional[LowRank] = None
    o_lora: Optional[LowRank] = None
    gate_up_lora: Optional[LowRank] = None
    down_lora: Optional[LowRank] = None


@flax.struct.dataclass
class InferenceWeights:
    """The model rearranged for decoding (see `inference_weights`). A pytree; pass it into jit."""

    embed: jax.Array  # [V, D]
    layers: tuple  # L x InferenceLayer
    final_norm: jax.Array  # [D]
    lm_head: Optional[jax.Array] = None  # [D, V]; None when tied (then the head is `embed`, [V, D])
    # How a T = 1 step contracts q with the cache (static): "reduce" (multiply + sum, fused over the
    # cache in its stored layout) or "dot" (batched matmuls). Both compute the same numbers.
    decode_attention: str = flax.struct.field(pytree_node=False, default="reduce")

    @property
    def dtype(self):
        """Activation (and cache) dtype: the embedding's, as in `forward`."""
        return self.embed.dtype


def default_decode_attention() -> str:
    """"reduce" on CPU (fewer kernels per decode step), "dot" elsewhere: on an H200 the sampler's
    decode reached 0.98 of the HBM bound with "dot" against 0.77 with "reduce"."""
    return "reduce" if jax.default_backend() == "cpu" else "dot"


_GROUPS = (("qkv", "self_attn", ("q_proj", "k_proj", "v_proj"), "input_layernorm"),
           ("o", "self_attn", ("o_proj",), None),
           ("gate_up", "mlp", ("gate_proj", "up_proj"), "post_attention_layernorm"),
           ("down", "mlp", ("down_proj",), None))


def inference_weights(params: Params, config: Qwen3Config, *, lora: Optional[Params] = None,
                      lora_scale: Any = 1.0, merge_lora: bool = False,
                      decode_attention: Optional[str] = None) -> InferenceWeights:
    """Rearranges `params` (and an optional LoRA tree) for `inference_forward`. Pure; jit it with
    `config`, `merge_lora` and `decode_attention` static (`lora_scale` may be traced).

    The result holds a second copy of the layer kernels (fused, norm-folded, split per layer), in
    the parameters' dtype; the fold and a merge are computed in float32 and cast back once. With
    `merge_lora`, each adapted kernel is W + lora_scale * A B (as `arca_jax.lora.merge`); otherwise
    the adapter stays a low-rank pair per projection group. `decode_attention`: see
    `InferenceWeights`; None picks `default_decode_attention()` for the current backend.
    """
    if decode_attention is None:
        decode_attention = default_decode_attention()
    if decode_attention not in ("reduce", "dot"):
        raise ValueError(f"decode_attention must be 'reduce' or 'dot', got {decode_attention!r}")
    layers_p = params["layers"]
    adapters = (lora or {}).get("layers", {})
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out_dims = {"q_proj": N * H, "k_proj": K * H, "v_proj": K * H, "o_proj": config.hidden_size,
                "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size,
                "down_proj": config.hidden_size}
    f32 = jnp.float32

    def kernel(block, proj):  # [L, in, out] float32
        w = layers_p[block][proj]["kernel"].astype(f32)
        ab = adapters.get(block, {}).get(proj)
        if ab is None or not merge_lora:
            return w
        return w + lora_scale * jnp.einsum("LIR,LRO->LIO", ab["lora_a"].astype(f32), ab["lora_b"].astype(f32))

    fused, low_rank = {}, {}
    for name, block, projs, norm in _GROUPS:
        dtype = layers_p[block][projs[0]]["kernel"].dtype
        rows = 1.0 if norm is None else layers_p[norm]["scale"].astype(f32)[:, :, None]  # [L, D, 1]
        ws = [kernel(block, p) for p in projs]
        fused[name] = (rows * (ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=-1))).astype(dtype)
        pairs = {p: adapters.get(block, {}).get(p) for p in projs}
        if merge_lora or all(ab is None for ab in pairs.values()):
            low_rank[name] = None
            continue
        a_parts, b_rows = [], []
        for p, ab in pairs.items():
            if ab is None:
                continue
            a_parts.append(ab["lora_a"])  # [L, in, R]
            b = ab["lora_b"]  # [L, R, out_p]
            cols = [b if q == p else jnp.zeros(b.shape[:2] + (out_dims[q],), b.dtype) for q in projs]
            b_rows.append(jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0])
        a = jnp.concatenate(a_parts, axis=-1)  # [L, in, R']
        b = jnp.concatenate(b_rows, axis=-2)  # [L, R', out]
        low_rank[name] = ((rows * a.astype(f32)).astype(a.dtype),
                          (lora_scale * b.astype(f32)).astype(b.dtype))

    attn = layers_p["self_attn"]
    qk_norm = jnp.concatenate([  # [L, N+K, H]
        jnp.broadcast_to(attn["q_norm"]["scale"][:, None, :], (config.num_hidden_layers, N, H)),
        jnp.broadcast_to(attn["k_norm"]["scale"][:, None, :], (config.num_hidden_layers, K, H))], axis=1)
    layers = []
    for i in range(config.num_hidden_layers):
        lr = {f"{name}_lora": None if low_rank[name] is None
              else LowRank(a=low_rank[name][0][i], b=low_rank[name][1][i]) for name, *_ in _GROUPS}
        layers.append(InferenceLayer(qkv=fused["qkv"][i], qk_norm=qk_norm[i], o=fused["o"][i],
                                     gate_up=fused["gate_up"][i], down=fused["down"][i], **lr))
    return InferenceWeights(
        embed=params["embed_tokens"]["embedding"], layers=tuple(layers),
        final_norm=params["norm"]["scale"],
        lm_head=None if config.tie_word_embeddings else params["lm_head"]["kernel"],
        decode_attention=decode_attention)


@flax.struct.dataclass
class InferenceCache:
    """Key/value buffers of `inference_forward`, one pair per layer. Returned, never mutated.

    k, v:  tuples of L arrays [B, K, S, H] in the activation dtype.
    valid: [B, S] bool, slots holding a real (non-padding) token.
    index: [] int32, the slot the next token is written to (shared by all rows: prompts are
           left-padded, so every row writes the same slot).
    """

    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, size: int, dtype=jnp.float32) -> "InferenceCache":
        shape = (batch, config.num_key_value_heads, size, config.head_dim)
        L = config.num_hidden_layers
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   valid=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        """S, the number of slots."""
        return self.valid.shape[1]


@flax.struct.dataclass
class InferenceOutput:
    """logits [B, V] float32 at the last input position; the updated cache."""

    logits: jax.Array
    cache: InferenceCache


def _inv_rms(x, eps):
    """1 / rms(x) over the last axis, float32, keepdims."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _project(x, w, low_rank: Optional[LowRank], out_dtype):
    """x [B, T, in] @ w [in, out] (+ (x a) b), accumulated in float32, returned in `out_dtype`."""
    y = jnp.einsum("BTI,IO->BTO", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if low_rank is not None:
        xa = jnp.einsum("BTI,IR->BTR", x.astype(low_rank.a.dtype), low_rank.a)
        y = y + jnp.einsum("BTR,RO->BTO", xa, low_rank.b, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _attend(q, k, v, bias, config: Qwen3Config, decode_attention: str):
    """Grouped-query attention of q [B, T, N, H] over the cache k, v [B, K, S, H] with an additive
    mask bias [B, T, S] (0 or float32 min); returns [B, T, N*H] in q's dtype. Scores and softmax in
    float32, the probabilities cast to q's dtype before they weight v (as `Attention`).

    For T = 1 with decode_attention "reduce", both contractions are a multiply and a sum, which XLA
    fuses into one pass over the cache each, in its stored layout; as matmuls ("dot") XLA CPU first
    transposes the small operands (on the CPU benchmark model, 140 kernels per decode step instead
    of 110)."""
    B, T, N, H = q.shape
    K, G = config.num_key_value_heads, config.num_groups
    f32 = jnp.float32
    if T == 1 and decode_attention == "reduce":
        q1 = q.reshape(B, K, G, H).astype(f32)
        scores = jnp.sum(q1[:, :, :, None, :] * k.astype(f32)[:, :, None, :, :], axis=-1)  # [B, K, G, S]
        scores = scores * (H ** -0.5) + bias[:, None, :, :]  # bias [B, 1, 1, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).astype(f32)
        out = jnp.sum(probs[..., None] * v.astype(f32)[:, :, None, :, :], axis=-2)  # [B, K, G, H]
        return out.astype(q.dtype).reshape(B, 1, N * H)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q.reshape(B, T, K, G, H), k,
                        preferred_element_type=f32) * (H ** -0.5)
    probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BKSH->BTKGH", probs, v).reshape(B, T, N * H)


def inference_forward(weights: InferenceWeights, input_ids: jax.Array, *, config: Qwen3Config,
                      positions: jax.Array, attention_mask: jax.Array,
                      cache: InferenceCache) -> InferenceOutput:
    """The model over T new tokens written at `cache.index`; logits at the last position only.

    Computes what `forward(params, ..., cache=...)` computes (no dropout; LoRA as prepared by
    `inference_weights`), up to float rounding. Pure: jit it with `config` static.

    Args:
      weights: from `inference_weights`.
      input_ids: [B, T] int tokens (T = prompt width for a prefill, 1 for a decode step).
      positions: [B, T] int rotary positions (`default_positions` of the prompt mask; then each
        row's running count).
      attention_mask: [B, T] 1 for real tokens; 0 slots are never attended to.
      cache: `InferenceCache` with at least cache.index + T slots.

    Returns:
      InferenceOutput(logits [B, V] float32 for the token at T - 1, cache with the T tokens written
      and index advanced by T).
    """
    c = config
    B, T = input_ids.shape
    N, K, H, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    S = cache.size
    dtype = weights.dtype
    f32 = jnp.float32
    zero = jnp.zeros((), jnp.int32)

    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (zero, cache.index))
    query_slot = cache.index + jnp.arange(T, dtype=jnp.int32)  # [T]
    visible = valid[:, None, :] & (jnp.arange(S, dtype=jnp.int32)[None, :] <= query_slot[:, None])[None]
    bias = jnp.where(visible, 0.0, jnp.finfo(f32).min).astype(f32)  # [B, T, S]
    cos, sin = rope_tables(positions, H, c.rope_theta)  # [B, T, H]
    cos = cos[:, :, None, :].astype(dtype)
    sin = sin[:, :, None, :].astype(dtype)

    x = jnp.take(weights.embed, input_ids, axis=0, mode="clip").astype(dtype)  # [B, T, D]
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(weights.layers, cache.k, cache.v):
        # input_layernorm folded into qkv: norm(x) W = (x diag(w) W) / rms(x)
        qkv = _project(x, layer.qkv, layer.qkv_lora, f32) * _inv_rms(x, c.rms_norm_eps)
        qk = qkv[..., :(N + K) * H].reshape(B, T, N + K, H)
        qk = (qk * _inv_rms(qk, c.rms_norm_eps)).astype(dtype) * layer.qk_norm.astype(dtype)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:, :, :N], qk[:, :, N:]
        v = qkv[..., (N + K) * H:].astype(dtype).reshape(B, T, K, H)
        start = (zero, zero, cache.index, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), start)
        new_k.append(k_cache)
        new_v.append(v_cache)
        attn = _attend(q, k_cache.astype(dtype), v_cache.astype(dtype), bias, c, weights.decode_attention)
        x = x + _project(attn, layer.o, layer.o_lora, dtype)

        gu = _project(x, layer.gate_up, layer.gate_up_lora, f32) * _inv_rms(x, c.rms_norm_eps)
        h = (jax.nn.silu(gu[..., :F].astype(dtype)) * gu[..., F:].astype(dtype))
        x = x + _project(h, layer.down, layer.down_lora, dtype)

    last = x[:, -1]  # [B, D]
    last = (last * _inv_rms(last, c.rms_norm_eps)).astype(dtype) * weights.final_norm.astype(dtype)
    if weights.lm_head is None:
        logits = jnp.einsum("BD,VD->BV", last, weights.embed.astype(dtype), preferred_element_type=f32)
    else:
        logits = jnp.einsum("BD,DV->BV", last, weights.lm_head.astype(dtype), preferred_element_type=f32)
    new_cache = InferenceCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=cache.index + T)
    return InferenceOutput(logits=logits, cache=new_cache)
