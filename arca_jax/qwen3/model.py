"""The training and scoring model: the pure `forward(params, ...)` over Flax linen layer modules.

The whole sequence runs at once, without a KV cache (the sampler decodes with `inference`). One
`DecoderLayer` (a linen module: attention, MLP, LoRA projections) is applied to each layer's slice
of the stacked parameter and adapter trees by `jax.lax.scan` (`layer_stack`), with optional
rematerialisation (`remat_policy`) and a choice of attention kernel (`resolve_attention`); the
embedding, final norm and head are plain functions of the tree. A `Qwen3MoeConfig` model runs its
layers as `moe.segments` (one scan per run of sparse or dense layers; one scan in all for the
released models) and also returns its routing statistics.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.core
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from arca_jax.qwen3 import cpu_attention, cpu_kernels, moe
from arca_jax.qwen3.common import Params, apply_rope, default_positions, per_head, rms_norm, rope_tables
from arca_jax.qwen3.config import Qwen3Config, Qwen3MoeConfig
from arca_jax.qwen3.einsum_attention import (causal_blocks, masked_attention, plain_attention,
                                             resolve_attention_blocks)


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, V] float32 (None when not asked for); hidden [B, T, D] after the final norm;
    layers [L, B, T, D]: each decoder layer's output (the residual stream before the final norm;
    layers[L - 1] is `hidden` before it), only when asked for (`forward(return_layers=True)`).

    Mixture-of-experts models only (None for dense ones), per sparse layer over the real tokens:
    aux_loss [Ls] the Switch load-balancing loss (`moe.aux_loss`; `moe.load_balancing_loss` of
    expert_load and router_prob is transformers' `aux_loss`), expert_load [Ls, E] the fraction of
    routed (token, expert) pairs per expert, router_prob [Ls, E] the mean router probability."""

    logits: Optional[jax.Array]
    hidden: jax.Array
    layers: Optional[jax.Array] = None
    aux_loss: Optional[jax.Array] = None
    expert_load: Optional[jax.Array] = None
    router_prob: Optional[jax.Array] = None


@flax.struct.dataclass
class _Context:
    """Per-call arrays shared (broadcast) by every layer."""

    cos: jax.Array  # [B, T, H] float32
    sin: jax.Array  # [B, T, H] float32
    visible: Optional[jax.Array]  # [B, T, S] bool (S = T), query t may attend to key s ("einsum")
    # "cudnn" / "sdpa-xla" only: [B] int32 tokens per row; each row's tokens occupy slots
    # [0, lengths) (`forward` rotates the rows so), attention is causal within them.
    lengths: Optional[jax.Array] = None
    # mixture-of-experts models: [B, T] bool, the real tokens (routing statistics count only them)
    token_mask: Optional[jax.Array] = None
    attention: str = flax.struct.field(pytree_node=False, default="einsum")
    # "einsum" only: the backward recomputes the attention probabilities (`masked_attention`)
    # instead of keeping them; off under remat, whose replay of the layer computes them anyway
    recompute_probs: bool = flax.struct.field(pytree_node=False, default=False)
    # "einsum" only: query blocks, each attending to the keys up to its end (`causal_blocks`)
    attention_blocks: int = flax.struct.field(pytree_node=False, default=1)


# --------------------------------------------------------------------------------------------
# Execution options (static)
# --------------------------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "einsum", "cpu-kernel", "cudnn", "sdpa-xla")
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


def resolve_attention(attention: str, dtype, mesh: Any = None) -> str:
    """The attention implementation `forward` runs.

    "einsum": scores and softmax as explicit XLA ops over [B, K, G, T, S] (any mask).
        "cpu-kernel": the same values from a C++ kernel on CPU that visits only the key tiles a
        query sees (`cpu_attention`; float32, any mask; built on first use). "cudnn":
        `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention
        (bf16/fp16 on NVIDIA GPUs), causal within each row's run of real tokens. "sdpa-xla": the
        same call and row layout with jax's XLA implementation (any backend and dtype; checks the
        "cudnn" plumbing on CPU). "auto": "cudnn" on a CUDA GPU of compute capability >= 8.0 with
        bf16/fp16 activations; "cpu-kernel" on a CPU backend with float32 activations where the
        kernel builds (`cpu_kernels.available()`) and the call runs without a `mesh` (XLA
        cannot split the custom call: it would gather its inputs); else "einsum".
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention {attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if attention == "auto":
        fused = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if fused and on_cuda(8.0):
            return "cudnn"
        if mesh is None and cpu_kernels.usable(dtype):
            return "cpu-kernel"
        return "einsum"
    if attention == "cpu-kernel":
        cpu_kernels.require("attention 'cpu-kernel'")
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


class RMSNorm(nn.Module):
    """weight * (x / rms(x)), statistics in float32, cast back to x's dtype before the weight (as HF)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, scale, self.eps)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@jax.custom_vjp
def lora_delta(x, a, b):
    """The adapter's update (x A) B: x [..., I], a [I, R], b [R, O] -> [..., O].

    Its backward pass is written out so that every matmul contracts the long token axis in
    place: dB = (x A)^T dy and dA = x^T (dy B^T) as dot_generals over the flattened tokens
    [N, .]. Left to autodiff, XLA:CPU materialised dy transposed ([O, N], the size of the
    projection output) for dB in every adapted layer: a third of the embedded demo's update step.
    The values are the same matmuls either way."""
    return _lora_delta_fwd(x, a, b)[0]


def _lora_delta_fwd(x, a, b):
    xa = checkpoint_name(jnp.einsum("...i,ir->...r", x, a), "lora_xa")
    return jnp.einsum("...r,ro->...o", xa, b), (x, xa, a, b)


def _lora_delta_bwd(res, dy):
    x, xa, a, b = res
    tokens = (((0,), (0,)), ((), ()))  # contract the flattened token axis of both operands
    dy2 = _rows(dy)  # [N, O]
    db = jax.lax.dot_general(_rows(xa), dy2, tokens)  # [R, O]
    dxa = dy2 @ b.T  # [N, R]
    da = jax.lax.dot_general(_rows(x), dxa, tokens)  # [I, R]
    dx = (dxa @ a.T).reshape(x.shape)  # [..., I]
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


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
            delta = lora_delta(xa, a.astype(dtype), b.astype(dtype))
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return checkpoint_name(y, "proj_out")


def _apply_rope(x, cos, sin):
    """x [B, T, N, H]; cos, sin [B, T, H] float32 (cast to x's dtype first, as HF)."""
    return apply_rope(x, per_head(cos, x.dtype), per_head(sin, x.dtype))


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
    def __call__(self, x, ctx: _Context):
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

        if ctx.attention == "cpu-kernel":
            q = jnp.transpose(q.reshape(B, T, K, G, H), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
            k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))  # [B, K, S, H]
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            out = cpu_attention.attention(f32(q), f32(k), f32(v), ctx.visible)
            out = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(v.dtype).reshape(B, T, N * H)
        elif ctx.attention != "einsum":
            out = _fused_attention(q, k, v, ctx.lengths, ctx.attention).reshape(B, T, N * H)
        else:
            q = q.reshape(B, T, K, G, H)
            attend = masked_attention if ctx.recompute_probs else plain_attention
            out = causal_blocks(attend, q, k, v, ctx.visible,
                                ctx.attention_blocks).reshape(B, T, N * H)
        out = checkpoint_name(out, "attn_out")
        return proj("o_proj", c.hidden_size)(out)


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
    return_layers: bool = False
    sparse: bool = False  # the mixture-of-experts MLP (`moe.SparseMoeBlock`) instead of `MLP`
    mesh: Any = None  # sparse layers: run the experts expert-parallel on this mesh (`moe.mixture`)

    @nn.compact
    def __call__(self, x, ctx: _Context):
        """(x [B, T, D], ctx) -> (x after the layer, the per-layer output of the scan over layers:
        x again when `return_layers`, else None; a sparse layer's is (that, `moe.RouterStats`))."""
        c = self.config
        x = x + Attention(c, self.lora_scale, self.lora_dropout, self.lora_dtype, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), ctx)
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x)
        if self.sparse:
            y, stats = moe.SparseMoeBlock(c, self.mesh, self.lora_scale, self.lora_dtype,
                                          name="mlp")(h, ctx.token_mask)
            x = x + y
            return x, ((x if self.return_layers else None), stats)
        x = x + MLP(c, self.lora_scale, self.lora_dropout, self.lora_dtype, name="mlp")(h)
        return x, (x if self.return_layers else None)


# Models of at most this many layers run them unrolled on CPU (`resolve_scan_layers`): the layer
# scan's stacked residuals (zero-filled [L, ...] buffers, written per layer, read back in the
# backward) cost more there than a longer program (the demo's 3-layer ARCA step, Xeon host,
# 2026-12-03: 553 -> 505 ms, uniform 450 -> 392 ms; compile + first call 9.5 -> 9.8 s).
CPU_UNROLL_LAYERS = 8


def resolve_scan_layers(scan: Optional[bool], num_layers: int,
                        platform: Optional[str] = None) -> bool:
    """Whether `forward` scans its layers (`jax.lax.scan`) or unrolls them: `scan` as given, or
    for None unrolled when `platform` (default: JAX's default backend) is "cpu" and the model has
    at most `CPU_UNROLL_LAYERS` layers, else scanned (GPU and TPU programs as before)."""
    if scan is None:
        return not ((platform or jax.default_backend()) == "cpu"
                    and num_layers <= CPU_UNROLL_LAYERS)
    if not isinstance(scan, bool):
        raise ValueError(f"scan_layers must be None, True or False, got {scan!r}")
    return scan


def layer_stack(layers: Params, lora_layers: Optional[Params], x, ctx: _Context, *,
                config: Qwen3Config, rng: Optional[jax.Array] = None, remat: Any = False,
                sparse: bool = False, mesh: Any = None, scan: bool = True, **options):
    """x [B, T, D] through the stacked layers: `DecoderLayer` applied to layer l's slice of every
    leaf of `layers` (and `lora_layers`), leading axis L, by `jax.lax.scan` (`scan`), or unrolled
    (each layer's slices taken statically; the same values, no stacked residuals).

    rng: the dropout key, split into one key per layer (None: no dropout). remat: see
    `remat_policy` (each layer is a `jax.checkpoint`). options: `DecoderLayer`'s lora_scale,
    lora_dropout, lora_dtype, return_layers. Returns (x after the last layer, the stacked
    per-layer outputs: layers [L, B, T, D] or None; for sparse layers (that, `moe.RouterStats` [L, E])).
    """
    layer = DecoderLayer(config, sparse=sparse, mesh=mesh, **options)
    length = jax.tree_util.tree_leaves(layers)[0].shape[0]

    def body(x, inputs):
        params, lora, key = inputs
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        return layer.apply(variables, x, ctx, rngs=None if key is None else {"dropout": key})

    policy = remat_policy(remat)
    if policy is not None:
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    keys = None if rng is None else jax.random.split(rng, length)
    if scan:
        return jax.lax.scan(body, x, (layers, lora_layers, keys))
    outs = []
    for l in range(length):
        x, out = body(x, jax.tree_util.tree_map(lambda a: a[l], (layers, lora_layers, keys)))
        outs.append(out)
    return x, jax.tree_util.tree_map(lambda *per_layer: jnp.stack(per_layer), *outs)


def _moe_layers(params: Params, lora: Optional[Params], x, ctx: _Context,
                config: Qwen3MoeConfig, rng: Optional[jax.Array] = None, **options):
    """The decoder layers of a mixture-of-experts model, one `layer_stack` per `moe.segments` run:
    x [B, T, D] -> (x, layers [L, B, T, D] or None, moe.RouterStats [Ls, E])."""
    per_layer, load, prob = [], [], []
    for i, segment in enumerate(moe.segments(config)):
        run_lora = None if lora is None else moe.segment_tree(lora["layers"], segment, config)
        x, out = layer_stack(moe.segment_tree(params["layers"], segment, config), run_lora, x, ctx,
                             config=config, sparse=segment.sparse,
                             rng=None if rng is None else jax.random.fold_in(rng, i), **options)
        if segment.sparse:
            out, stats = out
            load.append(stats.load)
            prob.append(stats.prob)
        per_layer.append(out)
    E = config.num_experts
    stats = moe.RouterStats(
        load=jnp.concatenate(load) if load else jnp.zeros((0, E), jnp.float32),
        prob=jnp.concatenate(prob) if prob else jnp.zeros((0, E), jnp.float32))
    layers = None if per_layer[0] is None else jnp.concatenate(per_layer)
    return x, layers, stats


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


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


def _rows_to_front(attention_mask):
    """The rotation of each row that moves its first real token to slot 0, for the fused kernels.

    Returns (src [B, T]: rotated slot i holds the caller's slot src[b, i], back [B, T]: its inverse,
    lengths [B]: real tokens per row, one_run [B]: the row's mask is one run of ones)."""
    T = attention_mask.shape[1]
    slot = jnp.arange(T, dtype=jnp.int32)[None, :]
    first = jnp.argmax(attention_mask, axis=1).astype(jnp.int32)[:, None]  # 0 for empty rows
    lengths = jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
    src = (slot + first) % T
    one_run = jnp.all(jnp.take_along_axis(attention_mask, src, axis=1)
                      == (slot < lengths[:, None]), axis=1)
    return src, (slot - first) % T, lengths, one_run


def forward(params: Params, input_ids: jax.Array, *, config: Qwen3Config,
            attention_mask: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
            lora: Optional[Params] = None, lora_scale: float = 1.0,
            lora_dropout: float = 0.0, rng: Optional[jax.Array] = None,
            return_logits: bool = True, remat: Any = False, attention: str = "auto",
            lora_dtype: Any = None, return_layers: bool = False,
            segment_ids: Optional[jax.Array] = None, prefix_ids: Optional[jax.Array] = None,
            mesh: Any = None, attention_blocks: Optional[int] = None,
            scan_layers: Optional[bool] = None) -> ModelOutput:
    """Runs the model over whole sequences (no cache: for decoding see `inference_forward`).
    Pure: jit it with `config` (and the other Python-valued options) static.

    Args:
      params: base parameter tree (float32 or bfloat16; activations follow the embedding's dtype).
      input_ids: [B, T] int tokens; prompts are left-padded.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (default all ones). Padded keys are
        never attended to; padded query positions produce finite but meaningless outputs.
      positions: [B, T] rotary positions (default `cumsum(attention_mask) - 1`).
      lora: adapter tree from `arca_jax.lora`, or None for the base model.
      lora_scale: multiplier of the adapter update (`LoraConfig.scaling` = alpha / rank).
      lora_dropout: dropout rate on the adapter input (training forward only); needs `rng`.
      return_logits: compute [B, T, V] float32 logits (skip for chunked log-probs).
      remat: rematerialise each layer in the backward pass (saves activation memory): False,
        True (= "full") or "projections" (see `remat_policy`).
      attention: "auto" (default), "einsum", "cpu-kernel", "cudnn" or "sdpa-xla" (see
        `resolve_attention`; "auto" is cuDNN flash attention on a CUDA GPU with bf16
        activations, the C++ kernel on CPU with float32 ones where it builds, else "einsum").
        "cudnn" and "sdpa-xla" need each row's attention_mask to be one run of ones (left
        padding, right padding, or both: what the sampler's batches are); the rows are rotated so
        that their tokens start at slot 0, attention runs causally over that run, and the hidden
        states are rotated back. A row with a hole in its mask gets NaN hidden states there
        (never silently wrong values): use "einsum" for such masks. Values equal "einsum" up to
        float rounding; dropout masks are drawn in the rotated layout (same distribution,
        different draw).
      lora_dtype: dtype of the adapter matmuls; None: the activation dtype (see `LoraLinear`).
      return_layers: also return each decoder layer's output [L, B, T, D] (the scan's stacked
        per-layer output: L x the hidden states' memory; static). False leaves the program as it
        was.
      segment_ids: [B, T] int, packed sequences (`arca_jax.packing`): slot t of line b holds a
        token of sequence segment_ids[b, t] (0: an empty slot); attention is causal within each
        segment and never crosses segments. Give `positions` (each sequence's own); the
        attention mask defaults to segment_ids > 0. "einsum" or "cpu-kernel" attention only
        ("auto" resolves to one of them; the fused kernels are refused).
      prefix_ids: [B, T] int, with segment_ids: slot t also attends to the slots of segment
        prefix_ids[b, t] that precede it (a prompt shared by several sequences of the line,
        `arca_jax.packing.plan_shared`); 0: none.
      mesh: the ("data", "fsdp", "tensor") mesh the call runs on (static), or None. A
        mixture-of-experts model then runs its experts expert-parallel over "fsdp"
        (`moe.expert_parallel`: each device computes the experts it holds, the tokens sent to
        them). "auto" attention is not the CPU kernel under a mesh (`resolve_attention`).
      attention_blocks: "einsum" attention in this many query blocks, each attending to the keys
        up to its end (`causal_blocks`: the same values, fewer scores); None: 4 on CPU, else 1
        (`resolve_attention_blocks`; static). The other implementations ignore it.
      scan_layers: run the layers as one `jax.lax.scan` (True) or unrolled (False); None:
        unrolled on CPU for models of at most `CPU_UNROLL_LAYERS` layers, else scanned
        (`resolve_scan_layers`; static). The same values either way.

    Returns:
      ModelOutput(logits [B, T, V] float32 or None, hidden [B, T, D] after the final RMSNorm,
      layers [L, B, T, D] or None; for a `Qwen3MoeConfig` also aux_loss [Ls], expert_load and
      router_prob [Ls, E] over the tokens of attention_mask). A mixture-of-experts model's
      adapters on its experts and router take no dropout (ValueError, `moe.check_lora`).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = (jnp.ones((B, T), jnp.int32) if segment_ids is None
                          else segment_ids > 0)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = default_positions(attention_mask)
    if prefix_ids is not None and segment_ids is None:
        raise ValueError("prefix_ids (shared prompts) need segment_ids")
    if segment_ids is None:
        impl = resolve_attention(attention, params["embed_tokens"]["embedding"].dtype, mesh)
    elif attention in ("auto", "einsum", "cpu-kernel"):
        dtype = params["embed_tokens"]["embedding"].dtype
        impl = "cpu-kernel" if resolve_attention(attention, dtype, mesh) == "cpu-kernel" else "einsum"
    else:
        raise ValueError("segment_ids (packed sequences) need attention 'einsum' or 'cpu-kernel', "
                         f"not {attention!r}")
    policy = remat_policy(remat)  # validates
    rotated = impl not in ("einsum", "cpu-kernel")
    if rotated:  # rows rotated left so that each row's tokens occupy slots [0, n)
        src, back, lengths, one_run = _rows_to_front(attention_mask)
        input_ids = jnp.take_along_axis(input_ids, src, axis=1)
        positions = jnp.take_along_axis(positions, src, axis=1)
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
    is_moe = isinstance(config, Qwen3MoeConfig)
    token_mask = None
    if is_moe:
        moe.check_lora(lora, lora_dropout)
        token_mask = jnp.take_along_axis(attention_mask, src, axis=1) if rotated else attention_mask
    if rotated:
        ctx = _Context(cos=cos, sin=sin, visible=None, lengths=jnp.maximum(lengths, 1),
                       token_mask=token_mask, attention=impl)
    else:
        visible = jnp.tril(jnp.ones((T, T), bool))[None] & attention_mask[:, None, :]
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            if prefix_ids is not None:
                same = same | (prefix_ids[:, :, None] == segment_ids[:, None, :])
            visible = visible & same
        ctx = _Context(cos=cos, sin=sin, visible=visible, token_mask=token_mask, attention=impl,
                       recompute_probs=policy is None,
                       attention_blocks=resolve_attention_blocks(attention_blocks))

    dropout = lora_dropout if lora is not None else 0.0
    if dropout > 0.0 and rng is None:
        raise ValueError("lora_dropout > 0 needs an `rng` key")
    options = dict(rng=rng if dropout > 0.0 else None, remat=remat, lora_scale=lora_scale,
                   lora_dropout=dropout, lora_dtype=lora_dtype, return_layers=return_layers,
                   scan=resolve_scan_layers(scan_layers, config.num_hidden_layers))
    x = jnp.take(params["embed_tokens"]["embedding"], input_ids, axis=0)  # [B, T, D]
    stats = None
    if is_moe:
        x, layers, stats = _moe_layers(params, lora, x, ctx, config, mesh=mesh, **options)
    else:
        x, layers = layer_stack(params["layers"], None if lora is None else lora.get("layers"),
                                x, ctx, config=config, **options)
    hidden = rms_norm(x, params["norm"]["scale"], config.rms_norm_eps)
    if rotated:  # back to the caller's layout; rows whose mask is not one run: NaN
        hidden = jnp.take_along_axis(hidden, back[:, :, None], axis=1)
        hidden = jnp.where(one_run[:, None, None], hidden, jnp.asarray(jnp.nan, hidden.dtype))
        if layers is not None:
            layers = jnp.take_along_axis(layers, back[None, :, :, None], axis=2)
            layers = jnp.where(one_run[None, :, None, None], layers,
                               jnp.asarray(jnp.nan, layers.dtype))
    logits = compute_logits(params, hidden, config) if return_logits else None
    if stats is None:
        return ModelOutput(logits=logits, hidden=hidden, layers=layers)
    return ModelOutput(logits=logits, hidden=hidden, layers=layers,
                       aux_loss=moe.aux_loss(stats.load, stats.prob, config.num_experts_per_tok),
                       expert_load=stats.load, router_prob=stats.prob)


def init_params(config: Qwen3Config, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0.02) kernels and embedding, unit norms) in `dtype`: each layer
    initialised as its `DecoderLayer` from its own key, stacked. For tests and benchmarks; under
    `jax.eval_shape` it allocates nothing."""
    ctx = _Context(cos=jnp.zeros((1, 1, config.head_dim)), sin=jnp.zeros((1, 1, config.head_dim)),
                   visible=jnp.ones((1, 1, 1), bool))
    x = jnp.zeros((1, 1, config.hidden_size), jnp.float32)
    embed_rng, layers_rng, head_rng = jax.random.split(rng, 3)

    def stack(sparse: bool, length: int, key):  # [length, ...] per leaf
        layer = DecoderLayer(config, sparse=sparse)
        one = lambda k: flax.core.unfreeze(layer.init(k, x, ctx)["params"])  # noqa: E731
        return jax.vmap(one)(jax.random.split(key, length))

    if isinstance(config, Qwen3MoeConfig):
        layers = moe.join_layers(
            [(seg, stack(seg.sparse, seg.stop - seg.start, jax.random.fold_in(layers_rng, i)))
             for i, seg in enumerate(moe.segments(config))], config)
    else:
        layers = stack(False, config.num_hidden_layers, layers_rng)
    params = {"embed_tokens": {"embedding": 0.02 * jax.random.normal(
                  embed_rng, (config.vocab_size, config.hidden_size), jnp.float32)},
              "layers": layers,
              "norm": {"scale": jnp.ones((config.hidden_size,), jnp.float32)}}
    if not config.tie_word_embeddings:  # read by `compute_logits`
        params["lm_head"] = {"kernel": 0.02 * jax.random.normal(
            head_rng, (config.hidden_size, config.vocab_size), jnp.float32)}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def param_shapes(config: Qwen3Config, dtype=jnp.float32) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))
