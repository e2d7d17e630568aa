"""Token-level credit assignment: the token weightings (a registry holding the paper's five and
any user-defined ones) and their normalisation. Their Gini / EffN/T diagnostics are in
``arca_jax.diagnostics``.

A trajectory's scalar advantage A is spread over its completion tokens with weights w_t >= 0 that
sum to 1 per row; the policy-gradient estimate is A * sum_t w_t grad log pi(y_t). Every scheme
gives an unnormalised salience alpha_t >= 0 per token, which is then normalised within its row::

    w_t = (alpha_t + eps)^s / sum_k (alpha_k + eps)^s        over the valid tokens of the row

(s = ``sharpening``; s = 1 is the plain (alpha + eps) / sum(alpha + eps) of the paper, the paper's
sweep used s = 2).

A weighting is a ``Weighting``: a pure function from named per-token signals to saliences alpha
[B, T], declared with the signals it reads (``SIGNALS``: ``logps`` policy log-probs, ``ref_logps``
reference log-probs (adapter off), ``entropies``, ``residual_norms`` (ARCA's ||h_adapted - h_base||),
``mask``). The training step runs only the forwards those signals need. Everything after the
salience is shared by every weighting: the clamp to [0, float32 max], the eps floor, sharpening,
normalisation and the uniform fallback (and the diagnostics measure any weighting's weights)::

    @credit.register("arca_x_surprisal", needs=("residual_norms", "logps"))
    def arca_x_surprisal(residual_norms, logps):
        return residual_norms * -logps

    GRPOConfig(weighting="arca_x_surprisal")           # or "my_module:arca_x_surprisal"

A mode is named by a registered name (``registered()``; the paper's five are ``MODES``), by an
import path "module:attribute" naming a ``Weighting`` (resolved on use, e.g. at config
validation), or given as a ``Weighting``.

Dimension letters: B batch (any number of leading axes, including none), T time (tokens, last
axis). All arrays share the mask's shape [B, T]. Every function is pure, has no host round trips
and works under ``jax.jit`` (``mode`` is static), ``jax.vmap``, ``jax.pmap`` and with sharded
inputs; nothing loops over rows in Python.

Decisions taken where the issue is silent (each also stated where it applies):

- Validity: a token is valid where ``mask != 0`` (bool, int or float masks). Inputs are only read
  at valid positions; padding may hold anything, NaN and inf included, without effect.
- Dtypes: all inputs are upcast to float32 first; outputs are float32 (bfloat16 in, float32 out).
- Saliences are clamped to [0, float32 max]: a negative salience (e.g. a "surprisal" from a
  positive log-prob, which only bad input produces) counts as 0, and +inf counts as the largest
  float32. NaN at a valid position is not hidden: that row's valid weights all become NaN.
- Overflow: the weights are computed as ((alpha + eps) / m)^s / sum_k ((alpha_k + eps) / m)^s
  with m the row maximum of alpha + eps (for s < 1 the ratio is taken after the power). This is
  algebraically identical to the formula above, equal to it up to float32 rounding (a few ulp)
  wherever the formula does not overflow, and finite for any salience and any s > 0: e.g.
  alpha = 1e30 with s = 2 works. Weights whose true value is below the float32 normal range
  (~1e-38) come out as 0.
- Fallback: it compares the *unscaled, sharpened* normalising sum sum_k (alpha_k + eps)^s with eps
  (as the issue's formula states it; an overflow of that sum to +inf counts as "above eps"). Rows
  whose sum is not above eps get uniform weights 1/n over their n valid tokens (a NaN sum is not
  "not above eps": NaN stays visible).
- ``uniform`` gives 1/n with n the number of valid tokens of the row (the issue's "1/T").
- Entropy reduction pairs each valid token with the next valid token of the same row, found with a
  vectorised reverse cumulative-min scan, so masks with holes work; the last valid token gets 0.
- Inputs a mode does not need are ignored (not validated): a caller may pass all it has.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp

Array = jax.Array

_F32_MAX = float(jnp.finfo(jnp.float32).max)


def divide_by_row(x: Array, d: Array) -> Array:
    """x / d for d > 0 broadcast along T, safe for d near the float32 maximum.

    XLA turns a division by a broadcast row value into a multiplication by its reciprocal, and
    1/d is subnormal (flushed to 0 on CPU/GPU) for d > ~8.5e37; dividing twice by sqrt(d) keeps
    every intermediate normal. Costs ~2 ulp over a single division.
    """
    r = jnp.sqrt(d)
    return (x / r) / r


def _is_concrete_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Saliences
# --------------------------------------------------------------------------------------------


def next_valid_index(mask: Array) -> Array:
    """Index of the next valid token of the same row, for every position.

    mask: [B, T], nonzero = valid.
    Returns: [B, T] int32; entry t is min{k > t : mask[k]}, or T when no later valid token exists.
    Computed with a reverse cumulative-min scan (no loops), so holes and spans are handled.
    """
    valid = jnp.asarray(mask) != 0
    t = valid.shape[-1]
    idx = jnp.where(valid, jnp.arange(t, dtype=jnp.int32), jnp.int32(t))
    nearest_at_or_after = jax.lax.cummin(idx, axis=idx.ndim - 1, reverse=True)
    pad = jnp.full(idx.shape[:-1] + (1,), t, dtype=jnp.int32)
    return jnp.concatenate([nearest_at_or_after[..., 1:], pad], axis=-1)


def entropy_reduction(entropies: Array, mask: Array) -> Array:
    """Entropy-reduction salience max(0, H_t - H_next(t)).

    entropies: [B, T], entropy (nats) of the predictive distribution that produced token t.
    mask: [B, T], nonzero = valid.
    Returns: [B, T] float32 (nats); next(t) is the next valid token of the same row; the last valid
    token of a row and all invalid positions get 0. Entropies at invalid positions are never read.
    """
    valid = jnp.asarray(mask) != 0
    h = jnp.where(valid, jnp.asarray(entropies).astype(jnp.float32), 0.0)
    nxt = next_valid_index(valid)
    t = valid.shape[-1]
    h_next = jnp.take_along_axis(h, jnp.minimum(nxt, t - 1), axis=-1)
    has_next = valid & (nxt < t)
    return jnp.where(has_next, jnp.maximum(h - h_next, 0.0), 0.0)


# --------------------------------------------------------------------------------------------
# The registry of weightings
# --------------------------------------------------------------------------------------------

#: The signals a weighting may read, each [B, T] and aligned with the mask: ``logps`` log pi(y_t)
#: under the current policy, ``ref_logps`` log pi_ref(y_t) with the adapter off, ``entropies`` the
#: predictive entropy H_t (nats) that produced token t, ``residual_norms`` ||h_adapted - h_base||_2
#: at the position scoring token t (ARCA), ``mask`` the validity mask (bool, True = counts).
SIGNALS: tuple[str, ...] = ("logps", "ref_logps", "entropies", "residual_norms", "mask")


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A token weighting: a pure function from named per-token signals to saliences [B, T].

    name: the name it is registered and logged under (no ":"; that marks import paths).
    fn: called as ``fn(**{s: signal_s for s in needs})``; each signal is a [B, T] array (float32,
        detached; ``mask`` bool), and fn returns the unnormalised saliences alpha [B, T] (any
        real dtype, upcast to float32). It must be traceable (jnp operations, no host round trips:
        it runs under jit, pmap and on sharded arrays) and should give alpha >= 0: negatives
        count as 0, +inf as the float32 maximum, and values at invalid positions are never read.
        NaN at a valid position makes that row's weights NaN (not hidden).
    needs: the signals fn reads, a subset of ``SIGNALS``; the step runs the base forward (adapter
        off) only when one of them is ``ref_logps`` or ``residual_norms``.

    Hashable (a static argument under jit). ``token_weights(w, mask, ...)`` turns it into weights:
    eps floor, sharpening, per-row normalisation and the uniform fallback apply as for the paper's
    weightings.
    """

    name: str
    fn: Callable[..., Any]
    needs: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"a weighting's name must be a non-empty string without ':', got "
                             f"{self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"weighting {self.name!r}: fn must be callable, got {self.fn!r}")
        needs = (self.needs,) if isinstance(self.needs, str) else tuple(self.needs)
        unknown = [n for n in needs if n not in SIGNALS]
        if unknown or len(set(needs)) != len(needs):
            raise ValueError(f"weighting {self.name!r}: needs {needs!r} must name distinct "
                             f"signals of {SIGNALS}")
        object.__setattr__(self, "needs", needs)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The keyword inputs of ``token_weights`` it reads: ``needs`` without the mask."""
        return tuple(n for n in self.needs if n != "mask")

    def __call__(self, **signals: Array) -> Array:
        """The raw saliences ``fn`` returns from the signals it needs (others are ignored)."""
        return self.fn(**{k: signals[k] for k in self.needs})


_REGISTRY: dict[str, Weighting] = {}


def register(name: str, *, needs, fn: Callable[..., Any] | None = None,
             replace: bool = False):
    """Registers a weighting under ``name`` (``GRPOConfig(weighting=name)``, config
    ``grpo.weighting: name``): a decorator when ``fn`` is None, else registers ``fn``.

        @credit.register("arca_x_surprisal", needs=("residual_norms", "logps"))
        def arca_x_surprisal(residual_norms, logps):
            return residual_norms * -logps

    Returns the ``Weighting`` (what the decorator leaves under the function's name, so that
    "module:arca_x_surprisal" resolves to it too). A taken name raises ValueError unless
    ``replace`` (the paper's five can never be replaced). A train step already built keeps the
    weighting it was traced with (jit caches on the name): build a new step after replacing.
    """
    def add(f):
        w = Weighting(name, f, needs)
        if w.name in _BUILTIN:
            raise ValueError(f"{w.name!r} is one of the paper's weightings and cannot be replaced")
        if w.name in _REGISTRY and not replace:
            raise ValueError(f"a weighting named {w.name!r} is already registered (pass "
                             "replace=True to replace it)")
        _REGISTRY[w.name] = w
        return w

    return add if fn is None else add(fn)


def unregister(name: str) -> None:
    """Removes a user-registered weighting (KeyError if none; the paper's five stay)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is one of the paper's weightings and cannot be removed")
    del _REGISTRY[name]


def registered() -> tuple[str, ...]:
    """The registered names in registration order: the paper's five (``MODES``) first."""
    return tuple(_REGISTRY)


def _unknown(mode) -> ValueError:
    return ValueError(f"unknown credit mode {mode!r}; valid modes: {', '.join(_REGISTRY)}, or "
                      "an import path 'module:attribute' naming a credit.Weighting")


def get(mode: Union[str, Weighting]) -> Weighting:
    """The ``Weighting`` of ``mode``: a registered name, an import path "module:attribute" (the
    module is imported; the attribute must be a ``Weighting``, e.g. what ``register`` returns),
    or a ``Weighting`` itself. ValueError for anything else, naming the valid modes."""
    if isinstance(mode, Weighting):
        return mode
    if not isinstance(mode, str):
        raise _unknown(mode)
    if mode in _REGISTRY:
        return _REGISTRY[mode]
    module, sep, attr = mode.partition(":")
    if not sep or not module or not attr:
        raise _unknown(mode)
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"credit mode {mode!r}: cannot import module {module!r} ({e}); is it "
                         "on the Python path (PYTHONPATH)?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"credit mode {mode!r}: module {module!r} has no attribute "
                             f"{attr!r}") from None
        obj = getattr(obj, part)
    if not isinstance(obj, Weighting):
        raise ValueError(f"credit mode {mode!r} is a {type(obj).__name__}, not a "
                         "credit.Weighting: declare the signals it reads with "
                         "@credit.register(name, needs=...) or credit.Weighting(name, fn, needs)")
    return obj


def required_inputs(mode: Union[str, Weighting]) -> tuple[str, ...]:
    """Names of the keyword inputs ``token_weights(mode, ...)`` needs (the signals besides the
    mask); ValueError if unknown."""
    return get(mode).inputs


def _uniform_salience() -> Array:  # never called: token_weights returns 1/n for it directly
    raise AssertionError("uniform weights do not depend on a salience")


def _surprisal(logps: Array) -> Array:
    return -logps


def _entropy_reduction(entropies: Array, mask: Array) -> Array:
    return entropy_reduction(entropies, mask)


def _divergence(logps: Array, ref_logps: Array) -> Array:
    return jnp.abs(logps - ref_logps)


def _arca(residual_norms: Array) -> Array:
    return residual_norms


for _w in (Weighting("uniform", _uniform_salience, ()),
           Weighting("surprisal", _surprisal, ("logps",)),
           Weighting("entropy_reduction", _entropy_reduction, ("entropies", "mask")),
           Weighting("divergence", _divergence, ("logps", "ref_logps")),
           Weighting("arca", _arca, ("residual_norms",))):
    _REGISTRY[_w.name] = _w
del _w

#: The paper's five weightings, in its table order (all registered; ``registered()`` adds the
#: user's).
MODES: tuple[str, ...] = registered()
_BUILTIN = frozenset(MODES)

#: Keyword inputs each of the paper's modes needs, in the order of ``token_weights``' signature
#: (``required_inputs`` answers for any mode). The training step uses it to decide which forwards
#: to run (e.g. ``divergence`` needs a reference forward).
REQUIRED_INPUTS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {m: _REGISTRY[m].inputs for m in MODES})


def saliences(
    mode: Union[str, Weighting],
    mask: Array,
    *,
    logps: Array | None = None,
    ref_logps: Array | None = None,
    entropies: Array | None = None,
    residual_norms: Array | None = None,
) -> Array:
    """Unnormalised salience alpha_t of ``mode``, clamped to [0, float32 max].

    mode: static; a registered name (``registered()``, the paper's five are ``MODES``), an import
        path "module:attribute" or a ``Weighting`` (see ``get``).
    mask: [B, T], nonzero = valid completion token.
    logps: [B, T], log pi(y_t) (nats) under the current policy (surprisal, divergence).
    ref_logps: [B, T], log pi_ref(y_t) (nats), adapter disabled (divergence).
    entropies: [B, T], predictive entropy H_t (nats) that produced token t (entropy_reduction).
    residual_norms: [B, T], ||h_adapted - h_base||_2 of the final post-norm hidden state at the
        position whose logits score token t, already aligned by the caller (arca).
    Only the inputs the weighting needs are read (upcast to float32); it gets the mask as bool.
    Returns: [B, T] float32, 0 at invalid positions. ``uniform`` returns zeros (its weights do not
    depend on a salience). Raises ValueError for an unknown mode, missing inputs, or an input or
    a returned salience whose shape differs from the mask's.
    """
    w = get(mode)
    label = mode if isinstance(mode, str) else w.name
    mask = jnp.asarray(mask)
    if mask.ndim < 1:
        raise ValueError(f"mask must have a time axis, got shape {mask.shape}")
    given = {"logps": logps, "ref_logps": ref_logps, "entropies": entropies,
             "residual_norms": residual_norms}
    needed = w.inputs
    missing = [name for name in needed if given[name] is None]
    if missing:
        raise ValueError(f"credit mode {label!r} needs {', '.join(missing)} (missing)")
    x = {}
    for name in needed:
        arr = jnp.asarray(given[name])
        if arr.shape != mask.shape:
            raise ValueError(f"{name} has shape {arr.shape}, mask has shape {mask.shape}")
        x[name] = arr.astype(jnp.float32)
    valid = mask != 0

    if w.fn is _uniform_salience:
        alpha = jnp.zeros(mask.shape, jnp.float32)
    else:
        alpha = jnp.asarray(w(mask=valid, **x))
        if alpha.shape != mask.shape:
            raise ValueError(f"credit mode {label!r} returned saliences of shape {alpha.shape}, "
                             f"mask has shape {mask.shape}")
        alpha = alpha.astype(jnp.float32)
    # Padding may hold NaN/inf: select (not multiply) so it never reaches the result.
    return jnp.where(valid, jnp.clip(alpha, 0.0, _F32_MAX), 0.0)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def normalize_saliences(alpha: Array, mask: Array, *, eps: float = 1e-8,
                        sharpening: float = 1.0) -> Array:
    """Per-row weights w_t = (alpha_t + eps)^s / sum_k (alpha_k + eps)^s over the valid tokens.

    alpha: [B, T] saliences, >= 0 (negatives are clamped to 0, +inf to the float32 maximum;
        invalid positions are never read).
    mask: [B, T], nonzero = valid.
    eps: >= 0, added to every salience before sharpening and the fallback threshold.
    sharpening: s > 0, exponent applied to (alpha + eps) before normalising.
    Returns: [B, T] float32 weights; each row with a valid token sums to 1, invalid positions and
    rows without valid tokens are 0 (never NaN, also in gradients).

    The sum is evaluated as sum_k ((alpha_k + eps) / m)^s with m the row maximum of alpha + eps,
    which cannot overflow; the result equals the formula up to float32 rounding (weights below the
    float32 normal range, ~1e-38, become 0). A row falls back to uniform 1/n over its n valid
    tokens when the unscaled sum sum_k (alpha_k + eps)^s is not above eps (an overflow of that sum
    to +inf counts as above). NaN at a valid position makes the row's valid weights NaN.
    ``eps`` and ``sharpening`` may be traced scalars; then they are not validated.
    """
    if _is_concrete_number(eps) and not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if _is_concrete_number(sharpening) and not sharpening > 0:
        raise ValueError(f"sharpening must be > 0, got {sharpening}")
    valid = jnp.asarray(mask) != 0
    alpha = jnp.asarray(alpha).astype(jnp.float32)
    if alpha.shape != valid.shape:
        raise ValueError(f"alpha has shape {alpha.shape}, mask has shape {valid.shape}")
    eps32 = jnp.asarray(eps, jnp.float32)
    s = jnp.asarray(sharpening, jnp.float32)

    x = jnp.where(valid, jnp.clip(alpha, 0.0, _F32_MAX), 0.0) + eps32
    x = jnp.where(valid, jnp.minimum(x, _F32_MAX), 0.0)  # [B, T], >= eps on valid tokens
    n = jnp.sum(valid, axis=-1, keepdims=True)  # [B, 1]

    # Fallback test on the literal, unscaled sum; +inf (overflow) compares as "above eps" and NaN
    # (NaN salience at a valid token) takes the formula, so that the NaN is not hidden.
    raw_sum = jnp.sum(jnp.where(valid, x ** s, 0.0), axis=-1, keepdims=True)
    use_formula = ~(raw_sum <= eps32)  # [B, 1]

    # r = (x / m)^s, evaluated as (x^q / m^q)^(s/q) with q = min(s, 1): x^q cannot overflow, and
    # for s < 1 the ratio is taken after the power, so it does not underflow before it.
    positive = valid & ~(x <= 0)  # NaN stays "positive" so that it propagates
    x_safe = jnp.where(positive, x, 1.0)  # keeps pow and its gradient finite
    if _is_concrete_number(sharpening) and sharpening == 1:
        xq = x_safe
    else:
        q = jnp.minimum(s, 1.0)
        xq = x_safe ** q
    xq = jnp.where(positive, xq, 0.0)
    mq = jnp.max(xq, axis=-1, keepdims=True)  # m^q; 0 for rows without a positive entry
    t = divide_by_row(xq, jnp.where(mq > 0, mq, 1.0))  # in [0, ~1], row maximum ~1
    if _is_concrete_number(sharpening) and sharpening <= 1:
        r = t
    else:
        r = jnp.where(positive, jnp.where(positive, t, 1.0) ** (s / q), 0.0)
    denom = jnp.sum(r, axis=-1, keepdims=True)  # >= ~1 when the row has a positive entry
    formula = r / jnp.where(denom > 0, denom, 1.0)

    uniform = valid / jnp.maximum(n, 1).astype(jnp.float32)
    w = jnp.where(use_formula, formula, uniform)
    # XLA's max reduction does not reliably propagate NaN, so a NaN row is marked explicitly.
    has_nan = jnp.any(valid & jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(valid, jnp.where(has_nan, jnp.nan, w), 0.0)


# deliberate: the same keyword signature as `saliences`, which it forwards to
def token_weights(
    mode: Union[str, Weighting],
    mask: Array,
    *,
    logps: Array | None = None,
    ref_logps: Array | None = None,
    entropies: Array | None = None,
    residual_norms: Array | None = None,
    eps: float = 1e-8,
    sharpening: float = 1.0,
) -> Array:
    """Per-token credit weights of a weighting (the paper's schemes or a registered one).

    mode: static; a registered name, an import path "module:attribute" or a ``Weighting`` (see
        ``get``). The paper's five (``MODES``):
        "uniform": 1/n over the n valid tokens of a row (length-normalised GRPO);
        "surprisal": alpha_t = -log pi(y_t);
        "entropy_reduction": alpha_t = max(0, H_t - H_next(t)), next(t) = next valid token of the
            same row, 0 for the last valid token;
        "divergence": alpha_t = |log pi(y_t) - log pi_ref(y_t)|;
        "arca": alpha_t = residual_norms_t.
        A user's weighting gives alpha_t from the signals it declares (``Weighting``); the same
        clamp, eps, sharpening, normalisation and fallback follow.
    mask: [B, T], nonzero = valid completion token; any layout (prefix, middle span, holes).
    logps, ref_logps, entropies, residual_norms: [B, T] (any float dtype, upcast to float32),
        see ``saliences``; only those in ``required_inputs(mode)`` are read, the others are
        ignored.
    eps, sharpening: see ``normalize_saliences``.
    Returns: [B, T] float32 weights; rows with a valid token sum to 1, zero off the mask, all-zero
    rows where the mask is empty. Callers should ``jax.lax.stop_gradient`` them (the paper detaches
    the weights); differentiating through is NaN-free but not part of the method.
    Raises ValueError naming the missing inputs of ``mode``, or listing the registered modes for
    an unknown one.
    """
    alpha = saliences(mode, mask, logps=logps, ref_logps=ref_logps, entropies=entropies,
                      residual_norms=residual_norms)
    if get(mode).fn is _uniform_salience:
        valid = jnp.asarray(mask) != 0
        n = jnp.sum(valid, axis=-1, keepdims=True)
        return valid / jnp.maximum(n, 1).astype(jnp.float32)
    return normalize_saliences(alpha, mask, eps=eps, sharpening=sharpening)
