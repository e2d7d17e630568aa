"""Hugging Face Qwen3 checkpoints <-> arca-jax parameter trees, without torch.

`load_pretrained` reads a local directory (config.json + model.safetensors, or a sharded
model.safetensors.index.json) tensor by tensor into the stacked tree of `arca_jax.qwen3`;
`save_pretrained` writes one that `transformers.Qwen3ForCausalLM.from_pretrained` (or
`Qwen3MoeForCausalLM`'s) loads.

Mixture-of-experts checkpoints (model_type "qwen3_moe", see `arca_jax.qwen3.moe`): the Hub layout
holds one tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight` [I, D], ...) and
the router as `mlp.gate.weight` [E, D]; they are stacked into [Ls, E, ...] on load and split on
save (what transformers' save_pretrained writes too). The layout transformers holds in memory
(`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]) is read as well.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import qwen3
from arca_jax.safetensors_io import CheckpointError, Lazy, SafetensorsFile, save_file

Params = Dict[str, Any]

# Tensors that a Qwen3 checkpoint may carry and the port does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class TensorEntry(NamedTuple):
    """Where one HF tensor (or a part of one) goes in the parameter tree.

    path: the tree path of the stacked leaf; index: the leaf's index of this tensor (() for an
    unstacked leaf, (l,) a layer, (l, e) a layer's expert); name: the HF tensor name; transpose:
    the HF tensor is the last two axes swapped ([out, in] for our [in, out]); rows: (start, stop,
    total) when the leaf holds rows [start, stop) of the HF tensor's axis -2 of length total
    (transformers' fused `experts.gate_up_proj`), else None."""

    path: Tuple[str, ...]
    index: Tuple[int, ...]
    name: str
    transpose: bool
    rows: Optional[Tuple[int, int, int]] = None


def hf_tensor_names(config: qwen3.Qwen3Config, fused_experts: bool = False) -> Iterator[TensorEntry]:
    """Yields a `TensorEntry` for every parameter (an MoE model's experts per expert, the Hub
    layout, or with `fused_experts` as transformers holds them in memory: [E, 2I, D], [E, D, I])."""
    yield TensorEntry(("embed_tokens", "embedding"), (), "model.embed_tokens.weight", False)
    yield TensorEntry(("norm", "scale"), (), "model.norm.weight", False)
    if not config.tie_word_embeddings:
        yield TensorEntry(("lm_head", "kernel"), (), "lm_head.weight", True)
    sparse = getattr(config, "sparse_layers", (False,) * config.num_hidden_layers)
    seen = {True: 0, False: 0}
    for layer in range(config.num_hidden_layers):
        pre = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield TensorEntry(("layers", norm, "scale"), (layer,), f"{pre}.{norm}.weight", False)
        for norm in ("q_norm", "k_norm"):
            yield TensorEntry(("layers", "self_attn", norm, "scale"), (layer,),
                              f"{pre}.self_attn.{norm}.weight", False)
        for proj in qwen3.ATTN_PROJS:
            yield TensorEntry(("layers", "self_attn", proj, "kernel"), (layer,),
                              f"{pre}.self_attn.{proj}.weight", True)
        kind = sparse[layer]
        j = seen[kind]
        seen[kind] += 1
        if not kind:
            for proj in qwen3.MLP_PROJS:
                yield TensorEntry(("layers", "mlp", proj, "kernel"), (j,), f"{pre}.mlp.{proj}.weight",
                                  True)
            continue
        yield TensorEntry(("layers", "mlp", "router", "kernel"), (j,), f"{pre}.mlp.gate.weight", True)
        experts = ("layers", "mlp", "experts")
        if fused_experts:
            I = config.moe_intermediate_size
            for proj, rows in (("gate_proj", (0, I, 2 * I)), ("up_proj", (I, 2 * I, 2 * I))):
                yield TensorEntry(experts + (proj, "kernel"), (j,), f"{pre}.mlp.experts.gate_up_proj",
                                  True, rows)
            yield TensorEntry(experts + ("down_proj", "kernel"), (j,), f"{pre}.mlp.experts.down_proj",
                              True)
            continue
        for e in range(config.num_experts):
            for proj in qwen3.MLP_PROJS:
                yield TensorEntry(experts + (proj, "kernel"), (j, e),
                                  f"{pre}.mlp.experts.{e}.{proj}.weight", True)


def _hf_shape(entry: TensorEntry, leaf_shape) -> Tuple[int, ...]:
    shape = list(leaf_shape[len(entry.index):])
    if entry.transpose:
        shape[-2:] = shape[-1], shape[-2]
    if entry.rows is not None:
        shape[-2] = entry.rows[2]
    return tuple(shape)


def _from_hf(entry: TensorEntry, t: np.ndarray) -> np.ndarray:
    if entry.rows is not None:
        t = t[..., entry.rows[0]:entry.rows[1], :]
    return np.swapaxes(t, -1, -2) if entry.transpose else t


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _weight_files(path: str) -> Dict[str, str]:
    """tensor name -> file, from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    if os.path.isfile(single):
        with SafetensorsFile(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          "(PyTorch .bin checkpoints are not read; convert them with transformers' "
                          "save_pretrained(safe_serialization=True))")


def load_pretrained(path: str, dtype=jnp.bfloat16,
                    shardings: Optional[Params] = None) -> Tuple[qwen3.Qwen3Config, Params]:
    """Loads a local Hugging Face Qwen3 checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: parameter dtype on device (bfloat16 for training and sampling; float32 for parity).
      shardings: optional tree of `jax.sharding.Sharding`s with the parameter tree's structure;
        each stacked leaf is placed directly with its sharding.

    Only one stacked leaf (e.g. all layers' q_proj) is ever held on the host at a time.
    Raises CheckpointError (a ValueError) naming the file and tensor for any mismatch.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json")
    config = qwen3.Qwen3Config.from_hf(path)
    files = _weight_files(path)
    shapes = qwen3.param_shapes(config, dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))

    fused = isinstance(config, qwen3.Qwen3MoeConfig) and any(
        n.endswith(".mlp.experts.gate_up_proj") for n in files)
    entries = list(hf_tensor_names(config, fused_experts=fused))
    expected = dict.fromkeys(entry.name for entry in entries)
    missing = [n for n in expected if n not in files]
    if missing:
        where = files[next(iter(files))] if files else path
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}"
                              f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''}")
    unexpected = [n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor(s) {unexpected[:5]} "
                              "for a Qwen3 model with this config.json")

    # Group HF tensors by destination leaf so each leaf is assembled once, then placed.
    by_leaf: Dict[Tuple[str, ...], list] = {}
    for entry in entries:
        by_leaf.setdefault(entry.path, []).append(entry)
    open_files: Dict[str, SafetensorsFile] = {}
    params: Params = {}
    try:
        for tree_path, leaf_entries in by_leaf.items():
            leaf = _get(shapes, tree_path)
            buf = np.empty(leaf.shape, np_dtype)
            for entry in leaf_entries:
                name = entry.name
                fname = files[name]
                if fname not in open_files:
                    open_files[fname] = SafetensorsFile(fname)
                f = open_files[fname]
                if name not in f.keys():
                    raise CheckpointError(f"{fname}: missing tensor {name!r} (listed in the index)")
                hf_shape = _hf_shape(entry, leaf.shape)
                if f.shape(name) != hf_shape:
                    raise CheckpointError(f"{fname}: tensor {name!r} has shape {f.shape(name)}, "
                                          f"config.json implies {hf_shape}")
                buf[entry.index] = _from_hf(entry, f.get(name)).astype(np_dtype)
            sharding = _get(shardings, tree_path) if shardings is not None else None
            _set(params, tree_path, jax.device_put(buf, sharding) if sharding is not None
                 else jnp.asarray(buf))
            del buf
    finally:
        for f in open_files.values():
            f.close()
    return config, params


def save_pretrained(path: str, config: qwen3.Qwen3Config, params: Params,
                    dtype: Any = None) -> None:
    """Writes config.json + model.safetensors (HF names and layouts) loadable by transformers.

    dtype: dtype of the written tensors (default: each parameter's own). One tensor is on the
    host at a time.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors: Dict[str, Any] = {}
    for entry in hf_tensor_names(config):
        leaf = _get(params, entry.path)
        out_dtype = np.dtype(jnp.dtype(dtype or leaf.dtype))

        def produce(leaf=leaf, entry=entry, out_dtype=out_dtype):
            t = np.asarray(leaf[entry.index])
            return (np.swapaxes(t, -1, -2) if entry.transpose else t).astype(out_dtype)

        tensors[entry.name] = Lazy(produce, _hf_shape(entry, leaf.shape), out_dtype)
    save_file(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    d = config.to_dict()
    d["torch_dtype"] = d["dtype"] = str(np.dtype(jnp.dtype(dtype or params["norm"]["scale"].dtype)))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def load_tokenizer(path: str):
    """The tokenizer of a local checkpoint directory, as ``transformers.AutoTokenizer`` loads it,
    without importing torch.

    ``AutoTokenizer``'s module imports transformers' model configuration code, which imports torch
    whenever torch is installed (~350 MB of resident memory a JAX run never uses). When
    ``tokenizer_config.json`` names its ``tokenizer_class`` (Hub checkpoints do: Qwen3's is
    "Qwen2Tokenizer"), that class is taken straight from ``transformers`` (a "...Fast" name as
    transformers 5 resolves it: the class without the suffix, which is the fast one). Anything
    else goes through ``AutoTokenizer``.
    """
    import transformers

    name = None
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        pass
    cls = None
    if isinstance(name, str) and name:
        for cand in [name] + ([name[:-4]] if name.endswith("Fast") else []):
            try:
                cls = getattr(transformers, cand)
                break
            except (AttributeError, ImportError):
                continue
    if cls is None:
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(path)
