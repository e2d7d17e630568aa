"""Qwen3Config and Qwen3MoeConfig: the model's shapes and constants, transformers' config.json in
both layouts (model_type "qwen3" and "qwen3_moe"), and the released models' presets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple

from arca_jax.errors import ConfigError, read_json

__all__ = ["ConfigError", "Qwen3Config", "Qwen3MoeConfig", "preset"]


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
        """Builds a config from a transformers config, a dict, or a config.json path (file or dir).

        Reads both config.json layouts: a top-level `rope_theta` (+ optional `rope_scaling`, written
        by transformers 4.x, as on the Hub) and `rope_parameters: {rope_type, rope_theta}` (5.x).
        A model_type "qwen3_moe" config gives a `Qwen3MoeConfig` (also from `Qwen3Config.from_hf`,
        so a path to either kind of checkpoint works unchanged). Refuses what the port does not
        implement (rope scaling, sliding windows, attention biases, another activation) with
        `ConfigError`.
        """
        d = _read_source(source)
        model_type = d.get("model_type", "qwen3")
        if model_type == "qwen3_moe" and cls is Qwen3Config:
            cls = Qwen3MoeConfig
        expected = "qwen3_moe" if issubclass(cls, Qwen3MoeConfig) else "qwen3"
        if model_type != expected:
            raise ConfigError(f"model_type is {model_type!r}, expected {expected!r}")
        return cls(**cls._fields_from_hf(d))

    @classmethod
    def _fields_from_hf(cls, d: Mapping[str, Any]) -> dict:
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

        return dict(
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

        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(Qwen3Config)}
        theta = kw.pop("rope_theta")
        cfg = transformers.Qwen3Config(**kw)
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        else:  # transformers 4.x
            cfg.rope_theta = theta
        return cfg

    def to_dict(self) -> dict:
        """config.json contents; carries both rope layouts so either transformers major reads it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(Qwen3Config)}
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
                 attention_bias=False, use_sliding_window=False,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3 mixture-of-experts (transformers' `Qwen3MoeConfig` field names; defaults as there).

    Layer l is sparse (router + E experts of width I, k routed per token) unless l is in
    `mlp_only_layers` or (l + 1) is not a multiple of `decoder_sparse_step`; dense layers keep the
    MLP of width `intermediate_size`. A `Qwen3Config` subclass, so every function of the dense
    model's config accepts it; frozen and hashable (mlp_only_layers is a sorted tuple).
    """

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: Tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "decoder_sparse_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"Qwen3MoeConfig.{name} must be a positive int, got {v!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_experts ({self.num_experts})")
        layers = self.mlp_only_layers
        if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {layers!r}")
        if any(not 0 <= i < self.num_hidden_layers for i in layers):
            raise ConfigError(f"mlp_only_layers {list(layers)} has an index outside "
                              f"[0, {self.num_hidden_layers})")
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "norm_topk_prob", bool(self.norm_topk_prob))

    @property
    def sparse_layers(self) -> Tuple[bool, ...]:
        """Per layer: True where the MLP is the sparse mixture of experts (transformers' rule)."""
        return tuple(i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    @classmethod
    def _fields_from_hf(cls, d: Mapping[str, Any]) -> dict:
        fields = super()._fields_from_hf(d)
        experts = d.get("num_experts", d.get("num_local_experts", cls.num_experts))
        fields.update(
            num_experts=experts,
            num_experts_per_tok=d.get("num_experts_per_tok", cls.num_experts_per_tok),
            moe_intermediate_size=d.get("moe_intermediate_size", cls.moe_intermediate_size),
            norm_topk_prob=bool(d.get("norm_topk_prob", cls.norm_topk_prob)),
            decoder_sparse_step=d.get("decoder_sparse_step", cls.decoder_sparse_step),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", cls.router_aux_loss_coef)))
        return fields

    def to_hf(self):
        """The equivalent `transformers.Qwen3MoeConfig`."""
        import transformers

        kw = self.to_dict()
        for key in ("model_type", "architectures", "rope_parameters"):
            kw.pop(key)
        theta = kw.pop("rope_theta")
        cfg = transformers.Qwen3MoeConfig(**kw)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        return cfg

    def to_dict(self) -> dict:
        """config.json contents (the Hub's field names: `num_experts`), both rope layouts."""
        d = super().to_dict()
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in d})
        d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                 mlp_only_layers=list(self.mlp_only_layers), output_router_logits=False)
        return d


def _read_source(source: Any) -> dict:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return read_json(path)
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise TypeError(f"from_hf takes a transformers config, a dict or a path, got {type(source)}")


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


# What every released Qwen3 dense model shares (its config.json on the Hub), then each one's shapes.
_RELEASED = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, rope_theta=1_000_000.0, eos_token_id=151643, bos_token_id=151643)
_PRESETS = {  # hidden, MLP, layers, query heads, tied embeddings
    "Qwen3-0.6B": (1024, 3072, 28, 16, True),
    "Qwen3-1.7B": (2048, 6144, 28, 16, True),
    "Qwen3-4B": (2560, 9728, 36, 32, True),
    "Qwen3-8B": (4096, 12288, 36, 32, False),
    "Qwen3-14B": (5120, 17408, 40, 40, False),
    "Qwen3-32B": (5120, 25600, 64, 64, False),
}


# The released mixture-of-experts models: every layer sparse, 4 KV heads, untied, top-k renormalised.
_MOE_PRESETS = {  # hidden, dense MLP (unused: no dense layers), expert width, layers, query heads
    "Qwen3-30B-A3B": (2048, 6144, 768, 48, 32),
    "Qwen3-235B-A22B": (4096, 12288, 1536, 94, 64),
}


def preset(name: str) -> Qwen3Config:
    """Shapes of a released Qwen3 model ("Qwen3-1.7B", "Qwen3-30B-A3B": a `Qwen3MoeConfig`; a
    "-Base" suffix or "Qwen/" prefix is accepted)."""
    key = name.split("/")[-1].removesuffix("-Base")
    if key in _MOE_PRESETS:
        hidden, mlp, expert, layers, heads = _MOE_PRESETS[key]
        return Qwen3MoeConfig(
            hidden_size=hidden, intermediate_size=mlp, moe_intermediate_size=expert,
            num_hidden_layers=layers, num_attention_heads=heads, tie_word_embeddings=False,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
            **{**_RELEASED, "num_key_value_heads": 4})
    if key not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(_PRESETS) + sorted(_MOE_PRESETS)}")
    hidden, mlp, layers, heads, tied = _PRESETS[key]
    return Qwen3Config(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, tie_word_embeddings=tied, **_RELEASED)
