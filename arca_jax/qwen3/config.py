"""Qwen3Config: the model's shapes and constants, transformers' config.json in both layouts, and the
released models' presets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from arca_jax.errors import ConfigError, read_json

__all__ = ["ConfigError", "Qwen3Config", "preset"]


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
            d = read_json(path)
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


def preset(name: str) -> Qwen3Config:
    """Shapes of a released Qwen3 model ("Qwen3-1.7B"; a "-Base" suffix or "Qwen/" prefix is accepted)."""
    key = name.split("/")[-1].removesuffix("-Base")
    if key not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
    hidden, mlp, layers, heads, tied = _PRESETS[key]
    return Qwen3Config(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, tie_word_embeddings=tied, **_RELEASED)
