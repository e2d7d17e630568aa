"""Qwen3 decoder in JAX: the training/scoring model `forward(params, ...)` (Flax linen) and the
decode path `inference_forward` over the `KVCache`, on one parameter tree.

Modules (every public name is re-exported here, so `from arca_jax import qwen3; qwen3.X`):
  config     `Qwen3Config` (transformers' field names, config.json in both rope layouts), its
             mixture-of-experts subclass `Qwen3MoeConfig` (model_type "qwen3_moe"), `preset`.
  model      the pure `forward` (whole sequences, no cache; attention kernels and
             rematerialisation options) over the linen `DecoderLayer`, scanned over the stacked
             layers by `layer_stack`; `init_params`, `param_shapes`, `compute_logits`.
  decode_weights  `inference_weights` (fused, norm-folded, per-layer kernels; LoRA merged or
             low-rank; a mixture of experts' sparse layers as `SparseMlp`; packed on CPU).
  inference  `KVCache`, `inference_forward` (T new tokens into the cache, every token routed as
             in `forward`; logits at the last, with `SoftmaxStats` from the CPU decode call).
  cache_attention  attention of new tokens over the cache (decode variants "reduce", "dot",
             "pallas"; filled blocks only), `cache_size`, `default_decode_attention`,
             `transposed_keys` (the key layout a variant reads).
  moe        the sparse MLP block (router, top-k, experts by `jax.lax.ragged_dot`), its routing
             statistics and load-balancing losses, the segments of a sparse/dense layer stack.
  cpu_kernels  the package's C++ kernels for XLA:CPU (one library built on first use):
             `cpu_attention` (the train step's packed attention), `cpu_matmul` (the decode
             path's projections over kernels packed in column panels) and `cpu_layers` (a
             decode step's layers and head as one call).
  common     what both use: parameter-tree names, rotary tables, `default_positions`, RMS norm.

Dimension letters (used in every einsum, shape comment and sharding spec of the project):
B batch, T query time, S key time (cache slots), D model width, F MLP width, N query heads,
K key/value heads, G query heads per KV head (N = K * G), H head width, V vocabulary, L layers,
R LoRA rank; mixture of experts: E experts, I expert width, k experts routed per token, Ls / Ld
the sparse / dense layers.

Parameter tree (plain nested dict; per-layer leaves are stacked on a leading L axis and the layers
of `forward` run under `jax.lax.scan`, so compile time does not grow with depth). Kernels are stored
[in, out]:

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

A `Qwen3MoeConfig` model keeps attention and norms stacked over all L layers; its MLPs are
stacked per kind (see `moe`): the sparse layers' `layers/mlp/router/kernel` [Ls, D, E],
`layers/mlp/experts/{gate,up}_proj/kernel` [Ls, E, D, I], `layers/mlp/experts/down_proj/kernel`
[Ls, E, I, D]; the dense layers' (`mlp_only_layers`, `decoder_sparse_step`) MLP as above over Ld.

The LoRA tree (see `arca_jax.lora`) mirrors the projections: `layers/<block>/<proj>/{lora_a [L, in, R],
lora_b [L, R, out]}` (a mixture of experts' expert adapters [Ls, E, ...] under `layers/mlp/experts`,
its router's under `layers/mlp/router`: see `moe`). It is passed as a separate Flax collection, so
`jax.grad` with respect to it sees only the adapter.
"""

from arca_jax.qwen3.common import (ATTN_PROJS, MLP_PROJS, PROJ_BLOCK, Params, default_positions,
                                   rope_tables)
from arca_jax.qwen3 import cpu_attention, cpu_kernels, cpu_layers, cpu_matmul, moe
from arca_jax.qwen3.config import ConfigError, Qwen3Config, Qwen3MoeConfig, preset
from arca_jax.qwen3.cache_attention import (DECODE_ATTENTION, cache_size, default_decode_attention,
                                            transposed_keys)
from arca_jax.qwen3.einsum_attention import (CPU_ATTENTION_BLOCKS, causal_blocks,
                                             masked_attention, resolve_attention_blocks)
from arca_jax.qwen3.decode_weights import (MATMULS, InferenceLayer, InferenceWeights, LowRank,
                                           SparseMlp, default_matmul, inference_weights)
from arca_jax.qwen3.inference import (SOFTMAX_BLOCK, InferenceOutput, KVCache, SoftmaxStats,
                                      inference_forward)
from arca_jax.qwen3.model import (ATTENTION_IMPLS, CPU_UNROLL_LAYERS, MLP, REMAT_OPTIONS,
                                  Attention, DecoderLayer, LoraLinear, ModelOutput, RMSNorm,
                                  layer_stack, compute_logits, forward, init_params,
                                  lm_head_kernel, on_cuda, param_shapes, remat_policy,
                                  resolve_attention, resolve_scan_layers)

__all__ = [
    # config
    "ConfigError", "Qwen3Config", "Qwen3MoeConfig", "preset", "moe", "cpu_attention", "cpu_kernels",
    "cpu_layers",
    "cpu_matmul",
    # parameter tree, positions
    "Params", "ATTN_PROJS", "MLP_PROJS", "PROJ_BLOCK", "default_positions", "rope_tables",
    # training / scoring model
    "ATTENTION_IMPLS", "REMAT_OPTIONS", "on_cuda", "resolve_attention", "remat_policy",
    "RMSNorm", "LoraLinear", "Attention", "MLP", "DecoderLayer", "layer_stack",
    "CPU_UNROLL_LAYERS", "resolve_scan_layers",
    "ModelOutput",
    "lm_head_kernel", "compute_logits", "forward", "init_params", "param_shapes",
    # the training forward's einsum attention
    "CPU_ATTENTION_BLOCKS", "resolve_attention_blocks", "causal_blocks", "masked_attention",
    # decode path
    "LowRank", "SparseMlp", "InferenceLayer", "InferenceWeights", "DECODE_ATTENTION", "default_decode_attention",
    "cache_size", "transposed_keys", "MATMULS", "default_matmul",
    "inference_weights", "KVCache", "InferenceOutput", "SoftmaxStats", "SOFTMAX_BLOCK",
    "inference_forward",
]
