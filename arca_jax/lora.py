"""LoRA adapters as explicit parameter trees, and PEFT adapter directories.

The adapter tree mirrors the model's projections (see `arca_jax.qwen3`):

    layers/self_attn/q_proj/lora_a   [L, D, R]      layers/self_attn/q_proj/lora_b   [L, R, N*H]
    ...                                              (one pair per targeted projection)

An adapted projection computes `x W + scaling * (x A) B`. The optimiser and gradients see only
this tree; the base parameters stay frozen and separate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import qwen3
from arca_jax.errors import read_json
from arca_jax.safetensors_io import CheckpointError, Lazy, SafetensorsFile, save_file

Params = Dict[str, Any]
ALL_TARGETS = qwen3.ATTN_PROJS + qwen3.MLP_PROJS
_PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank R, alpha, target projections, dropout on the adapter input (training forward only).

    scaling = alpha / R (alpha / sqrt(R) with use_rslora), as PEFT.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: Tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in ALL_TARGETS]
        if bad or not targets:
            raise ValueError(f"LoRA targets {bad or targets} invalid; choose from {ALL_TARGETS}")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _proj_dims(config: qwen3.Qwen3Config, proj: str) -> Tuple[int, int]:
    D, F = config.hidden_size, config.intermediate_size
    NH = config.num_attention_heads * config.head_dim
    KH = config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, NH), "k_proj": (D, KH), "v_proj": (D, KH), "o_proj": (NH, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[proj]


def check_targets(config: qwen3.Qwen3Config, targets, error=ValueError) -> None:
    """Raises `error` when `targets` are not adaptable on this model: a mixture-of-experts model
    (`qwen3.Qwen3MoeConfig`) takes adapters on its attention projections only, for now."""
    mlp = [t for t in targets if t in qwen3.MLP_PROJS]
    if isinstance(config, qwen3.Qwen3MoeConfig) and mlp:
        raise error(f"LoRA targets {mlp}: LoRA on the MLP of a mixture-of-experts model (experts, "
                    f"router, dense MLP layers) is not implemented; target the attention "
                    f"projections {list(qwen3.ATTN_PROJS)}")


def init_lora(config: qwen3.Qwen3Config, lora_config: LoraConfig, rng: jax.Array,
              dtype=jnp.float32) -> Params:
    """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default kaiming-uniform, a=sqrt(5)),
    B = 0, so the adapted model equals the base model at step 0. ValueError for targets the model
    cannot take (`check_targets`)."""
    check_targets(config, lora_config.targets)
    L, R = config.num_hidden_layers, lora_config.rank
    tree: Params = {}
    for i, proj in enumerate(lora_config.targets):
        d_in, d_out = _proj_dims(config, proj)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (L, d_in, R), jnp.float32, -bound, bound)
        tree.setdefault("layers", {}).setdefault(qwen3.PROJ_BLOCK[proj], {})[proj] = {
            "lora_a": a.astype(dtype), "lora_b": jnp.zeros((L, R, d_out), dtype)}
    return tree


def count_params(tree: Any) -> int:
    """Number of scalars in a tree (works on arrays and on `jax.ShapeDtypeStruct`s)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def iter_adapters(tree: Params):
    """Yields (projection name, block name, {'lora_a', 'lora_b'}) for every adapted projection."""
    for block, projs in tree.get("layers", {}).items():
        for proj, ab in projs.items():
            yield proj, block, ab


def merge(params: Params, tree: Params, lora_config: LoraConfig) -> Params:
    """Base parameters with the adapter folded in: W + scaling * A B (in W's dtype). Pure."""
    merged = jax.tree_util.tree_map(lambda x: x, params)  # new dict structure, shared leaves
    for proj, block, ab in iter_adapters(tree):
        w = params["layers"][block][proj]["kernel"]
        delta = jnp.einsum("LIR,LRO->LIO", ab["lora_a"].astype(jnp.float32),
                           ab["lora_b"].astype(jnp.float32))
        merged["layers"][block][proj] = {
            "kernel": (w.astype(jnp.float32) + lora_config.scaling * delta).astype(w.dtype)}
    return merged


# --------------------------------------------------------------------------------------------
# PEFT interop
# --------------------------------------------------------------------------------------------


def _peft_targets(raw: Any, path: str) -> Tuple[str, ...]:
    if raw == "all-linear":
        return ALL_TARGETS
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise CheckpointError(f"{path}: unsupported target_modules {raw!r}")
    out = []
    for t in raw:
        name = t.split(".")[-1]
        if name not in ALL_TARGETS:
            raise CheckpointError(f"{path}: target module {t!r} is not one of {ALL_TARGETS}")
        if name not in out:
            out.append(name)
    return tuple(p for p in ALL_TARGETS if p in out)


def load_peft(path: str, config: qwen3.Qwen3Config, dtype=jnp.float32) -> Tuple[LoraConfig, Params]:
    """Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    Refuses what the port cannot represent (DoRA, per-module rank/alpha patterns, biases, layer
    subsets, modules_to_save) with CheckpointError, naming the file and field.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    w_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: adapter directory not found")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no adapter_config.json")
    if not os.path.isfile(w_path):
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    c = read_json(cfg_path, CheckpointError)
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {c.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", lambda v: not v), ("rank_pattern", lambda v: not v),
                    ("alpha_pattern", lambda v: not v), ("layers_to_transform", lambda v: v is None),
                    ("modules_to_save", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                    ("bias", lambda v: v in (None, "none"))):
        if key in c and not ok(c[key]):
            raise CheckpointError(f"{cfg_path}: {key}={c[key]!r} is not supported")
    lora_config = LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                             targets=_peft_targets(c.get("target_modules"), cfg_path),
                             dropout=float(c.get("lora_dropout") or 0.0),
                             use_rslora=bool(c.get("use_rslora", False)))
    check_targets(config, lora_config.targets, lambda msg: CheckpointError(f"{cfg_path}: {msg}"))
    L = config.num_hidden_layers
    tree: Params = {}
    with SafetensorsFile(w_path) as f:
        expected = set()
        for proj in lora_config.targets:
            block = qwen3.PROJ_BLOCK[proj]
            d_in, d_out = _proj_dims(config, proj)
            a = np.empty((L, d_in, lora_config.rank), np.float32)
            b = np.empty((L, lora_config.rank, d_out), np.float32)
            for layer in range(L):
                for part, buf, shape in (("lora_A", a, (lora_config.rank, d_in)),
                                         ("lora_B", b, (d_out, lora_config.rank))):
                    name = f"{_PEFT_PREFIX}.{layer}.{block}.{proj}.{part}.weight"
                    expected.add(name)
                    if name not in f.keys():
                        raise CheckpointError(f"{w_path}: missing tensor {name!r}")
                    if f.shape(name) != shape:
                        raise CheckpointError(f"{w_path}: tensor {name!r} has shape {f.shape(name)}, "
                                              f"expected {shape}")
                    buf[layer] = f.get(name).T.astype(np.float32)
            tree.setdefault("layers", {}).setdefault(block, {})[proj] = {
                "lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
        unexpected = sorted(set(f.keys()) - expected)
        if unexpected:
            raise CheckpointError(f"{w_path}: unexpected tensor(s) {unexpected[:5]}")
    return lora_config, tree


def save_peft(path: str, lora_config: LoraConfig, tree: Params,
              base_model_name_or_path: Optional[str] = None) -> None:
    """Writes a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads onto the
    matching transformers Qwen3 model. `tree` may be any tree with the adapter's structure (a
    gradient or an optimiser moment too); tensors are written in float32."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors: Dict[str, Any] = {}
    targets = []
    for proj, block, ab in iter_adapters(tree):
        targets.append(proj)
        L = ab["lora_a"].shape[0]
        for layer in range(L):
            for part, key in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                leaf = ab[key]
                tensors[f"{_PEFT_PREFIX}.{layer}.{block}.{proj}.{part}.weight"] = Lazy(
                    lambda leaf=leaf, layer=layer: np.asarray(leaf[layer], np.float32).T,
                    tuple(reversed(leaf.shape[1:])), np.float32)
    if sorted(targets) != sorted(lora_config.targets):
        raise ValueError(f"tree adapts {sorted(targets)} but lora_config targets "
                         f"{sorted(lora_config.targets)}")
    save_file(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_config.rank,
        "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "target_modules": list(lora_config.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": lora_config.use_rslora, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
