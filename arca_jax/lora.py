"""LoRA adapters as explicit parameter trees, and PEFT adapter directories.

The adapter tree mirrors the model's projections (see `arca_jax.qwen3`):

    layers/self_attn/q_proj/lora_a   [L, D, R]      layers/self_attn/q_proj/lora_b   [L, R, N*H]
    ...                                              (one pair per targeted projection)

An adapted projection computes `x W + scaling * (x A) B`. The optimiser and gradients see only
this tree; the base parameters stay frozen and separate.

Targets are PEFT's module names: "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
"down_proj", and on a mixture-of-experts model (`qwen3.Qwen3MoeConfig`) "gate", the router (as
PEFT names transformers' `mlp.gate`). There an MLP projection adapts every expert of the sparse
layers, one (A, B) pair per expert:

    layers/mlp/experts/{gate,up}_proj/lora_a [Ls, E, D, R]   .../lora_b [Ls, E, R, I]
    layers/mlp/experts/down_proj/lora_a      [Ls, E, I, R]   .../lora_b [Ls, E, R, D]
    layers/mlp/router/lora_a                 [Ls, D, R]      .../lora_b [Ls, R, E]

The MLP of its dense layers (`mlp_only_layers`, `decoder_sparse_step`; none in the released
models) takes no adapter: PEFT on transformers 5 maps the MLP targets of a Qwen3 MoE model to the
fused expert parameters only. Expert and router adapters take no dropout (`check_targets`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import qwen3
from arca_jax.errors import read_json
from arca_jax.qwen3.common import merge_adapter
from arca_jax.safetensors_io import CheckpointError, Lazy, SafetensorsFile, save_file

Params = Dict[str, Any]
ALL_TARGETS = qwen3.ATTN_PROJS + qwen3.MLP_PROJS  # the default: every projection
ROUTER = "gate"  # a mixture-of-experts model's router (PEFT's name of transformers' `mlp.gate`)
TARGETS = ALL_TARGETS + (ROUTER,)
_PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank R, alpha, target projections (`TARGETS`), dropout on the adapter input (training
    forward only).

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
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"LoRA targets {bad or targets} invalid; choose from {TARGETS} "
                             f"({ROUTER!r}: a mixture-of-experts model's router)")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _proj_dims(config: qwen3.Qwen3Config, proj: str, width: Optional[int] = None) -> Tuple[int, int]:
    """(in, out) of a projection; width: the MLP's (default `intermediate_size`; an expert's I)."""
    D, F = config.hidden_size, width or config.intermediate_size
    NH = config.num_attention_heads * config.head_dim
    KH = config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, NH), "k_proj": (D, KH), "v_proj": (D, KH), "o_proj": (NH, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[proj]


class _Slot(NamedTuple):
    """One adapter of the tree: `target` at `path` under `layers`, factors lora_a [*lead, d_in, R]
    and lora_b [*lead, R, d_out]."""

    target: str
    path: Tuple[str, ...]
    lead: Tuple[int, ...]
    d_in: int
    d_out: int


def _slots(config: qwen3.Qwen3Config, targets) -> Iterator[_Slot]:
    """The adapters `targets` put on this model, target by target (`check_targets` first)."""
    L = config.num_hidden_layers
    moe = isinstance(config, qwen3.Qwen3MoeConfig)
    for t in targets:
        if t in qwen3.ATTN_PROJS or not moe:
            yield _Slot(t, (qwen3.PROJ_BLOCK[t], t), (L,), *_proj_dims(config, t))
            continue
        Ls, E = sum(config.sparse_layers), config.num_experts
        if t == ROUTER:
            yield _Slot(t, ("mlp", "router"), (Ls,), config.hidden_size, E)
        else:
            yield _Slot(t, ("mlp", "experts", t), (Ls, E),
                        *_proj_dims(config, t, config.moe_intermediate_size))


def check_targets(config: qwen3.Qwen3Config, targets, error=ValueError,
                  dropout: float = 0.0) -> None:
    """Raises `error` when `targets` are not adaptable on this model: the router ("gate") on a
    dense model, or adapter dropout > 0 with MLP targets on a mixture-of-experts model (its
    expert and router adapters take no dropout, as PEFT's on transformers' fused experts)."""
    moe = isinstance(config, qwen3.Qwen3MoeConfig)
    if ROUTER in targets and not moe:
        raise error(f"LoRA target {ROUTER!r} (the router) needs a mixture-of-experts model")
    mlp = [t for t in targets if t in qwen3.MLP_PROJS + (ROUTER,)]
    if moe and mlp and dropout > 0.0:
        raise error(f"LoRA targets {mlp} with dropout {dropout}: the expert and router adapters "
                    f"of a mixture-of-experts model take no dropout; set the dropout to 0")


def init_lora(config: qwen3.Qwen3Config, lora_config: LoraConfig, rng: jax.Array,
              dtype=jnp.float32) -> Params:
    """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default kaiming-uniform, a=sqrt(5)),
    B = 0, so the adapted model equals the base model at step 0. ValueError for targets the model
    cannot take (`check_targets`)."""
    check_targets(config, lora_config.targets, dropout=lora_config.dropout)
    R = lora_config.rank
    index = {t: i for i, t in enumerate(lora_config.targets)}
    tree: Params = {}
    for slot in _slots(config, lora_config.targets):
        key = jax.random.fold_in(rng, index[slot.target])
        bound = 1.0 / math.sqrt(slot.d_in)
        a = jax.random.uniform(key, slot.lead + (slot.d_in, R), jnp.float32, -bound, bound)
        node = tree.setdefault("layers", {})
        for name in slot.path[:-1]:
            node = node.setdefault(name, {})
        node[slot.path[-1]] = {"lora_a": a.astype(dtype),
                               "lora_b": jnp.zeros(slot.lead + (R, slot.d_out), dtype)}
    return tree


def count_params(tree: Any) -> int:
    """Number of scalars in a tree (works on arrays and on `jax.ShapeDtypeStruct`s)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def iter_adapters(tree: Params, _path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Params]]:
    """Yields (path under `layers`, {'lora_a', 'lora_b'}) for every adapted projection, e.g.
    (("self_attn", "q_proj"), ...), (("mlp", "experts", "down_proj"), ...)."""
    node = tree.get("layers", {}) if not _path else tree
    for name, sub in node.items():
        if "lora_a" in sub:
            yield _path + (name,), sub
        else:
            yield from iter_adapters(sub, _path + (name,))


def _target(path: Tuple[str, ...]) -> str:
    """The target name of an adapter path: the projection, or `ROUTER` for the router."""
    return ROUTER if path[-1] == "router" else path[-1]


def merge(params: Params, tree: Params, lora_config: LoraConfig) -> Params:
    """Base parameters with the adapter folded in: W + scaling * A B (in W's dtype; per expert
    for the experts' [Ls, E, ...] stacks). Pure."""
    merged = jax.tree_util.tree_map(lambda x: x, params)  # new dict structure, shared leaves
    for path, ab in iter_adapters(tree):
        node = merged["layers"]
        for name in path:
            node = node[name]
        node["kernel"] = merge_adapter(node["kernel"], ab, lora_config.scaling)
    return merged


# --------------------------------------------------------------------------------------------
# PEFT interop
# --------------------------------------------------------------------------------------------


def _peft_targets(raw: Any, path: str, config: qwen3.Qwen3Config) -> Tuple[str, ...]:
    if raw == "all-linear":  # as PEFT: every linear layer; a mixture of experts' router too
        return TARGETS if isinstance(config, qwen3.Qwen3MoeConfig) else ALL_TARGETS
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise CheckpointError(f"{path}: unsupported target_modules {raw!r}")
    out = []
    for t in raw:
        name = t.split(".")[-1]
        if name not in TARGETS:
            raise CheckpointError(f"{path}: target module {t!r} is not one of {TARGETS}")
        if name not in out:
            out.append(name)
    return tuple(p for p in TARGETS if p in out)


def _layer_indices(config: Optional[qwen3.Qwen3Config], path: Tuple[str, ...], n: int):
    """The decoder layers of the n stacked entries of the adapter at `path`: all L for attention
    and a dense model's MLP; a mixture of experts' sparse layers for its experts and router.
    config None: range(n), for trees without expert or router adapters."""
    if path[1] not in ("experts", "router"):
        return range(n)
    if config is None:
        raise ValueError("save_peft: an adapter on the experts or the router needs the "
                         "model's `config` (which layers are sparse)")
    return [i for i, sparse in enumerate(config.sparse_layers) if sparse]


def _peft_modules(config: Optional[qwen3.Qwen3Config], path: Tuple[str, ...],
                  lead: Tuple[int, ...]) -> Iterator[Tuple[Tuple[int, ...], str]]:
    """(index into the factors' leading dims, PEFT module name) of every module of one adapter:
    `{prefix}.{layer}.self_attn.q_proj`, `{prefix}.{layer}.mlp.experts.{e}.gate_proj` (one per
    expert, as transformers 4.x held them; PEFT on transformers 5 fuses them when it loads),
    `{prefix}.{layer}.mlp.gate` (the router)."""
    for j, layer in enumerate(_layer_indices(config, path, lead[0])):
        if path[1] == "experts":
            for e in range(lead[1]):
                yield (j, e), f"{_PEFT_PREFIX}.{layer}.mlp.experts.{e}.{path[2]}"
        elif path[1] == "router":
            yield (j,), f"{_PEFT_PREFIX}.{layer}.mlp.{ROUTER}"
        else:
            yield (j,), f"{_PEFT_PREFIX}.{layer}.{path[0]}.{path[1]}"


def load_peft(path: str, config: qwen3.Qwen3Config, dtype=jnp.float32) -> Tuple[LoraConfig, Params]:
    """Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    A mixture-of-experts model's expert adapters are read in transformers 4.x's layout (one
    module per expert, `mlp.experts.{e}.{gate,up,down}_proj`, what `save_peft` writes), the
    router's as `mlp.gate`. Refuses what the port cannot represent (DoRA, per-module rank/alpha
    patterns, biases, layer subsets, modules_to_save, target_parameters: PEFT's own save from
    transformers 5's fused experts) with CheckpointError, naming the file and field.
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
    for key, ok in (("target_parameters", lambda v: not v),  # PEFT's save on fused experts
                    ("use_dora", lambda v: not v), ("rank_pattern", lambda v: not v),
                    ("alpha_pattern", lambda v: not v), ("layers_to_transform", lambda v: v is None),
                    ("modules_to_save", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                    ("bias", lambda v: v in (None, "none"))):
        if key in c and not ok(c[key]):
            raise CheckpointError(f"{cfg_path}: {key}={c[key]!r} is not supported")
    lora_config = LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                             targets=_peft_targets(c.get("target_modules"), cfg_path, config),
                             dropout=float(c.get("lora_dropout") or 0.0),
                             use_rslora=bool(c.get("use_rslora", False)))
    check_targets(config, lora_config.targets, lambda msg: CheckpointError(f"{cfg_path}: {msg}"),
                  lora_config.dropout)
    R = lora_config.rank
    tree: Params = {}
    with SafetensorsFile(w_path) as f:
        expected = set()
        for slot in _slots(config, lora_config.targets):
            a = np.empty(slot.lead + (slot.d_in, R), np.float32)
            b = np.empty(slot.lead + (R, slot.d_out), np.float32)
            for at, module in _peft_modules(config, slot.path, slot.lead):
                for part, buf, shape in (("lora_A", a, (R, slot.d_in)),
                                         ("lora_B", b, (slot.d_out, R))):
                    name = f"{module}.{part}.weight"
                    expected.add(name)
                    if name not in f.keys():
                        raise CheckpointError(f"{w_path}: missing tensor {name!r}")
                    if f.shape(name) != shape:
                        raise CheckpointError(f"{w_path}: tensor {name!r} has shape {f.shape(name)}, "
                                              f"expected {shape}")
                    buf[at] = f.get(name).T.astype(np.float32)
            node = tree.setdefault("layers", {})
            for name in slot.path[:-1]:
                node = node.setdefault(name, {})
            node[slot.path[-1]] = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
        unexpected = sorted(set(f.keys()) - expected)
        if unexpected:
            raise CheckpointError(f"{w_path}: unexpected tensor(s) {unexpected[:5]}")
    return lora_config, tree


def save_peft(path: str, lora_config: LoraConfig, tree: Params,
              base_model_name_or_path: Optional[str] = None,
              config: Optional[qwen3.Qwen3Config] = None) -> None:
    """Writes a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads onto the
    matching transformers Qwen3 model. `tree` may be any tree with the adapter's structure (a
    gradient or an optimiser moment too); tensors are written in float32. A mixture-of-experts
    model's expert and router adapters need its `config` (which layers are sparse); they are
    written in transformers 4.x's per-expert layout (`load_peft`), which PEFT (>= 0.19 with
    transformers 5) converts onto the fused experts when it loads (rank and alpha of the fused
    gate_up_proj doubled, the router through `target_parameters`)."""
    path = os.fspath(path)
    tensors: Dict[str, Any] = {}
    targets = []
    for adapter_path, ab in iter_adapters(tree):
        if _target(adapter_path) not in targets:
            targets.append(_target(adapter_path))
        a, b = ab["lora_a"], ab["lora_b"]
        lead = tuple(a.shape[:-2])
        for at, module in _peft_modules(config, adapter_path, lead):
            for part, leaf in (("lora_A", a), ("lora_B", b)):
                tensors[f"{module}.{part}.weight"] = Lazy(
                    lambda leaf=leaf, at=at: np.asarray(leaf[at], np.float32).T,
                    tuple(reversed(leaf.shape[len(lead):])), np.float32)
    if sorted(targets) != sorted(lora_config.targets):
        raise ValueError(f"tree adapts {sorted(targets)} but lora_config targets "
                         f"{sorted(lora_config.targets)}")
    os.makedirs(path, exist_ok=True)
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
