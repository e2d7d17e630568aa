"""The one salience pipeline: forwards -> per-token signals -> every method's token weights.

The loss (``objective.loss_fn``) and the trainer's per-method logging (samples.jsonl, the
report's heatmap) both go through here, so the token alignment, the masks and the noise floor
are spelled once:

    valid   = completion_valid(batch)                                  [B, T] bool
    out     = policy_forward(lora, params, batch, layers=..., ...)     hidden [B, T, D] (adapter
                                                                       on), layers [L, B, T, D]
    signals = token_signals(params, batch, valid, out.hidden, need=..., h_layers=out.layers)
                                                                       named [B, T] signals
    w       = method_weights(method, signals, valid, grpo_config)      [B, T], rows sum to 1

Every signal is aligned with ``input_ids``: token t is scored by the hidden state at t - 1, and
each signal is 0 where ``valid`` is False. ``credit.required_inputs(method)`` names the signals a
method reads (any registered weighting, the paper's five or a user's); the base forward (adapter
off) runs only when one of them needs it, once for all.

ARCA's residual is measured where ``grpo.arca_layers`` says (``residual_layers``): the final
hidden state (the paper), or decoder layer outputs that both forwards return alongside it
(``needs_layers``: no extra forward), averaged over the layers, optionally relative to the base
norm (``grpo.arca_relative``). Dimension letters as in ``arca_jax.qwen3``; S: the measured
layers.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from arca_jax import credit, packing, parallel, qwen3
from arca_jax.batch import Batch, as_batch
from arca_jax.grpo.config import GRPOConfig
from arca_jax.grpo.logprobs import shift_right, token_logprobs

Array = jax.Array

SIGNALS = ("logps", "entropies", "ref_logps", "residual_norms")
# Signals read from the base forward (adapter off).
_BASE_SIGNALS = frozenset({"ref_logps", "residual_norms"})


@struct.dataclass
class Signals:
    """Per-token signals [B, T] float32 aligned with input_ids, 0 where not valid; None when not
    asked for.

    logps: log pi(y_t) under the adapted policy (differentiable when ``h`` is).
    entropies: predictive entropy (nats) of the distribution that scored token t (detached).
    ref_logps: log pi_ref(y_t) with the adapter off (detached).
    residual_norms: ||h_adapted - h_base||_2 at the position scoring token t, with the noise
        floor applied (detached); with ``grpo.arca_layers`` / ``arca_relative`` the mean over the
        measured layers of each layer's (relative) residual.
    residual_layers: [S, B, T] the per-layer residuals that ``residual_norms`` averages
        (S = 1 for "final"; detached).
    """

    logps: Array
    entropies: Optional[Array] = None
    ref_logps: Optional[Array] = None
    residual_norms: Optional[Array] = None
    residual_layers: Optional[Array] = None


def completion_valid(batch: Batch) -> Array:
    """[B, T] bool: tokens that count (completion_mask, attention_mask, and t >= 1)."""
    cm = batch.completion_mask != 0
    if batch.attention_mask is not None:
        cm = cm & (batch.attention_mask != 0)
    return cm & (jnp.arange(cm.shape[1]) >= 1)[None, :]


def signals_needed(methods: Iterable[str], *, kl: bool = False) -> FrozenSet[str]:
    """The signals the given weightings (and the KL term, when ``kl``) read. The policy
    log-probs are always computed (the loss needs them)."""
    need = {"logps"}
    for m in methods:
        need.update(credit.required_inputs(m))
    if kl:
        need.add("ref_logps")
    return frozenset(need)


def needs_base_forward(need: Iterable[str]) -> bool:
    return bool(_BASE_SIGNALS & set(need))


def residual_layers(grpo_config: GRPOConfig, num_layers: int) -> Optional[Tuple[int, ...]]:
    """The decoder layers whose outputs ARCA's residual reads (``grpo.arca_layers``): None for
    "final" (the final hidden state), (0, ..., L - 1) for "all", else the configured indices,
    each checked against the model's ``num_layers`` (ValueError)."""
    layers = grpo_config.arca_layers
    if layers == "final":
        return None
    if layers == "all":
        return tuple(range(num_layers))
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise ValueError(f"arca_layers {list(layers)}: the model has {num_layers} decoder layers "
                         f"(indices 0..{num_layers - 1}), not {bad}")
    return tuple(layers)


def residual_layer_count(grpo_config: GRPOConfig, num_layers: int) -> int:
    """S, the number of residuals ARCA averages (1 for "final")."""
    layers = residual_layers(grpo_config, num_layers)
    return 1 if layers is None else len(layers)


def needs_layers(grpo_config: GRPOConfig, need: Iterable[str]) -> bool:
    """Whether the forwards must return their per-layer outputs: ARCA's residual is read and
    measured at decoder layers."""
    return "residual_norms" in set(need) and grpo_config.arca_layers != "final"


def policy_forward(lora, params, batch: Batch, *, config: qwen3.Qwen3Config, lora_scale: float,
                   grpo_config: GRPOConfig, lora_dropout: float = 0.0,
                   rng: Optional[Array] = None, remat=False,
                   layers: bool = False, mesh=None) -> qwen3.ModelOutput:
    """One forward (``lora=None``: the base model) with the objective's execution options
    (attention implementation, adapter matmul dtype), without logits: hidden [B, T, D] and, when
    ``layers``, every decoder layer's output [L, B, T, D]. A packed batch (``batch.packing``)
    runs on its lines and comes back in the [B, T] layout (0 at padding) when the attention
    resolves to "einsum"; a fused kernel runs the padded rows instead (same values). ``mesh``:
    the mesh a "mesh" train step runs on; the inputs and outputs keep their rows on their devices
    (`parallel.constrain_rows`), and a mixture-of-experts model's experts run expert-parallel
    on it (`qwen3.forward(mesh=...)`). Its routing statistics (aux_loss, expert_load, router_prob
    over the real tokens) come back as `qwen3.forward` returns them."""
    g = grpo_config
    kw = dict(config=config, lora_scale=lora_scale, grpo_config=g, lora_dropout=lora_dropout,
              rng=rng, remat=remat, layers=layers, mesh=mesh)
    if mesh is None:
        return _forward(lora, params, batch, **kw)
    batch = batch.replace(input_ids=parallel.constrain_rows(batch.input_ids, mesh),
                          attention_mask=parallel.constrain_rows(batch.attention_mask, mesh))
    out = _forward(lora, params, batch, **kw)
    return out.replace(
        hidden=parallel.constrain_rows(out.hidden, mesh),
        layers=None if out.layers is None else parallel.constrain_rows(out.layers, mesh, 1))


def _forward(lora, params, batch: Batch, *, config: qwen3.Qwen3Config, lora_scale: float,
             grpo_config: GRPOConfig, lora_dropout: float, rng: Optional[Array], remat,
             layers: bool, mesh) -> qwen3.ModelOutput:
    """`policy_forward`'s model call (packed lines or the [B, T] batch as it comes)."""
    g = grpo_config
    pk = batch.packing
    impl = qwen3.resolve_attention(g.attention, params["embed_tokens"]["embedding"].dtype, mesh)
    if pk is not None and impl in ("einsum", "cpu-kernel"):  # the ones taking packed lines
        positions = batch.positions
        if positions is None:
            positions = qwen3.default_positions(batch.attention_mask)
        out = qwen3.forward(params, packing.to_lines(pk, batch.input_ids), config=config,
                            segment_ids=pk.segments, prefix_ids=pk.prefix,
                            positions=packing.to_lines(pk, positions),
                            lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, rng=rng,
                            return_logits=False, remat=remat, attention=impl,
                            lora_dtype=g.lora_dtype, return_layers=layers, mesh=mesh,
                            attention_blocks=g.attention_blocks, scan_layers=g.scan_layers)
        return out.replace(
            hidden=packing.from_lines(pk, out.hidden),
            layers=None if out.layers is None else packing.from_lines(pk, out.layers, axis=1))
    return qwen3.forward(params, batch.input_ids, config=config,
                         attention_mask=batch.attention_mask, positions=batch.positions,
                         lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, rng=rng,
                         return_logits=False, remat=remat, attention=g.attention,
                         lora_dtype=g.lora_dtype, return_layers=layers, mesh=mesh,
                         attention_blocks=g.attention_blocks, scan_layers=g.scan_layers)


def policy_hidden(lora, params, batch: Batch, *, config: qwen3.Qwen3Config, lora_scale: float,
                  grpo_config: GRPOConfig, lora_dropout: float = 0.0,
                  rng: Optional[Array] = None, remat=False) -> Array:
    """Final hidden states [B, T, D] of one forward (``policy_forward`` without layers)."""
    return policy_forward(lora, params, batch, config=config, lora_scale=lora_scale,
                          grpo_config=grpo_config, lora_dropout=lora_dropout, rng=rng,
                          remat=remat).hidden


def aligned_logprobs(params, h: Array, batch: Batch, valid: Array, *,
                     config: qwen3.Qwen3Config, grpo_config: GRPOConfig,
                     with_entropy: bool):
    """Log-probs and entropies of input_ids [B, T], aligned with them, 0 where not ``valid``.
    Token t is scored by the hidden state at t - 1, so the chunks run over shift_right(h) on the
    token grid: a completion that starts at a multiple of the chunk size fills whole chunks."""
    lp, ent = token_logprobs(params, shift_right(h), batch.input_ids, config=config,
                             chunk_size=grpo_config.logits_chunk, valid=valid,
                             with_entropy=with_entropy, grad_dtype=grpo_config.logits_grad_dtype,
                             logits_dtype=grpo_config.logits_dtype)
    return jnp.where(valid, lp, 0.0), jnp.where(valid, ent, 0.0)


def residual_norms(h: Array, h_base: Array, valid: Array, noise_floor: float, *,
                   relative: bool = False) -> Array:
    """ARCA saliences [..., B, T] aligned with input_ids from hidden states [..., B, T, D] (any
    leading axes, e.g. S layers): ||h - h_base||_2 at the position whose logits score each token
    (t - 1), 0 where not ``valid`` [B, T]. Below ``noise_floor * ||h_base||`` the two forwards
    differ only by float rounding (different fusions of the same math), so a zero adapter gives
    exactly 0, hence uniform weights. ``relative``: divided by ||h_base|| (0 where it is 0)."""
    hb32 = h_base.astype(jnp.float32)
    diff = h.astype(jnp.float32) - hb32
    rn = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # [..., B, T] at the scoring position
    base_norm = jnp.sqrt(jnp.sum(hb32 * hb32, axis=-1))
    rn = jnp.where(rn > noise_floor * base_norm, rn, 0.0)
    if relative:
        rn = jnp.where(base_norm > 0, rn / jnp.where(base_norm > 0, base_norm, 1.0), 0.0)
    aligned = jnp.concatenate([jnp.zeros_like(rn[..., :1]), rn[..., :-1]], axis=-1)  # over T
    return jnp.where(valid, aligned, 0.0)


def floored_reference(logps: Array, ref_logps: Array, noise_floor: float) -> Array:
    """Reference log-probs for the divergence salience with the same noise floor: where
    |log pi - log pi_ref| <= noise_floor * max(1, |log pi_ref|) the reference is taken equal to
    log pi (divergence 0)."""
    close = jnp.abs(logps - ref_logps) <= noise_floor * jnp.maximum(1.0, jnp.abs(ref_logps))
    return jnp.where(close, logps, ref_logps)


def _measured(x: Array, layers: Tuple[int, ...]) -> Array:
    """Layers ``layers`` of per-layer states [L, B, T, D] -> [S, B, T, D]."""
    return x if layers == tuple(range(x.shape[0])) else x[jnp.asarray(layers)]


def token_signals(params, batch: Batch, valid: Array, h: Array, *, config: qwen3.Qwen3Config,
                  grpo_config: GRPOConfig, need: FrozenSet[str],
                  h_layers: Optional[Array] = None, mesh=None) -> Signals:
    """The signals in ``need`` from the policy's hidden states ``h`` [B, T, D] (and one base
    forward, adapter off, when a base signal is needed). ``logps`` keeps ``h``'s gradient;
    every other signal is detached. ``h_layers``: the policy forward's per-layer outputs
    [L, B, T, D], required when ``needs_layers(grpo_config, need)``. ``mesh``: as
    ``policy_forward``'s, for the base forward."""
    g = grpo_config
    logps, entropies = aligned_logprobs(params, h, batch, valid, config=config, grpo_config=g,
                                        with_entropy="entropies" in need)
    ref_logps = residual = per_layer = None
    if needs_base_forward(need):
        layered = needs_layers(g, need)
        if layered and h_layers is None:
            raise ValueError(f"arca_layers {g.arca_layers!r} needs the policy forward's layer "
                             "outputs (policy_forward(..., layers=True)) as h_layers")
        base = jax.lax.stop_gradient(policy_forward(None, params, batch, config=config,
                                                    lora_scale=1.0, grpo_config=g,
                                                    layers=layered, mesh=mesh))
        if "ref_logps" in need:
            ref, _ = aligned_logprobs(params, base.hidden, batch, valid, config=config,
                                      grpo_config=g, with_entropy=False)
            ref_logps = jax.lax.stop_gradient(ref)
        if "residual_norms" in need:
            layers = residual_layers(g, config.num_hidden_layers)
            if layers is None:  # the final hidden state
                pol, hb = h[None], base.hidden[None]
            else:
                pol, hb = _measured(h_layers, layers), _measured(base.layers, layers)
            per_layer = residual_norms(jax.lax.stop_gradient(pol), hb, valid, g.noise_floor,
                                       relative=g.arca_relative)  # [S, B, T]
            residual = jnp.mean(per_layer, axis=0)
    return Signals(logps=logps, entropies=entropies if "entropies" in need else None,
                   ref_logps=ref_logps, residual_norms=residual, residual_layers=per_layer)


def method_weights(method: str, signals: Signals, valid: Array,
                   grpo_config: GRPOConfig) -> Array:
    """Token weights [B, T] of ``method`` (any ``credit`` mode) from ``signals`` (detached; rows
    with a valid token sum to 1). A method that reads the reference log-probs (divergence, or a
    user's weighting) gets them with the noise floor (``floored_reference``); the KL term reads
    the unfloored ones."""
    g = grpo_config
    logps = jax.lax.stop_gradient(signals.logps)
    ref = signals.ref_logps
    if "ref_logps" in credit.required_inputs(method):
        ref = floored_reference(logps, ref, g.noise_floor)
    return jax.lax.stop_gradient(credit.token_weights(
        method, valid, logps=logps, ref_logps=ref, entropies=signals.entropies,
        residual_norms=signals.residual_norms, eps=g.eps, sharpening=g.sharpening))


def all_method_weights(lora, params, batch, *, config: qwen3.Qwen3Config, lora_scale: float,
                       grpo_config: GRPOConfig,
                       methods: Sequence[str] = credit.MODES) -> Dict[str, Array]:
    """Every method's token weights [B, T] on the same trajectories (the trainer's samples log
    and the report's credit heatmap): one adapted forward (no dropout) and, when a method needs
    it, one base forward, through the same pipeline as the loss. ``methods``: any ``credit``
    modes (registered names or "module:attribute" paths); the result is keyed by them."""
    b = as_batch(batch)
    valid = completion_valid(b)
    need = signals_needed(methods)
    out = policy_forward(lora, params, b, config=config, lora_scale=lora_scale,
                         grpo_config=grpo_config, layers=needs_layers(grpo_config, need))
    sig = token_signals(params, b, valid, out.hidden, config=config, grpo_config=grpo_config,
                        need=need, h_layers=out.layers)
    return {m: method_weights(m, sig, valid, grpo_config) for m in methods}
