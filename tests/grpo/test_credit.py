"""Tests for arca_jax.credit (token weightings) and arca_jax.diagnostics (their concentration).

The oracle below is written from the paper's definitions with plain numpy loops over rows and
float64 arithmetic; it shares no code or tricks (max scaling, scans, sorting with +inf) with the
module under test.
"""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arca_jax.credit import (
    MODES,
    REQUIRED_INPUTS,
    next_valid_index,
    normalize_saliences,
    required_inputs,
    saliences,
    token_weights,
)
from arca_jax.diagnostics import concentration, concentration_per_row

INPUT_NAMES = ("logps", "ref_logps", "entropies", "residual_norms")


# ---------------------------------------------------------------------------------------------
# Independent numpy oracle
# ---------------------------------------------------------------------------------------------


def oracle_weights(mode, mask, inputs, eps, s):
    mask = np.asarray(mask) != 0
    B, T = mask.shape
    out = np.zeros((B, T), np.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        n = len(idx)
        if n == 0:
            continue
        if mode == "uniform":
            for t in idx:
                out[b, t] = 1.0 / n
            continue
        alpha = {}
        for j, t in enumerate(idx):
            if mode == "surprisal":
                a = -float(inputs["logps"][b, t])
            elif mode == "divergence":
                a = abs(float(inputs["logps"][b, t]) - float(inputs["ref_logps"][b, t]))
            elif mode == "arca":
                a = float(inputs["residual_norms"][b, t])
            elif mode == "entropy_reduction":
                if j + 1 < n:
                    nxt = idx[j + 1]
                    h = inputs["entropies"]
                    a = max(0.0, float(h[b, t]) - float(h[b, nxt]))
                else:
                    a = 0.0
            else:
                raise AssertionError(mode)
            alpha[t] = max(a, 0.0)
        powered = {t: (alpha[t] + eps) ** s for t in idx}
        total = sum(powered.values())
        for t in idx:
            out[b, t] = (1.0 / n) if total <= eps else powered[t] / total
    return out


def oracle_concentration_rows(weights, mask):
    weights = np.asarray(weights, np.float64)
    mask = np.asarray(mask) != 0
    B = mask.shape[0]
    gini = np.zeros(B)
    eff = np.zeros(B)
    g_ok = np.zeros(B, bool)
    e_ok = np.zeros(B, bool)
    for b in range(B):
        vals = sorted(float(weights[b, t]) for t in range(mask.shape[1]) if mask[b, t])
        n = len(vals)
        total = sum(vals)
        if n >= 2 and total > 0:
            gini[b] = sum((2 * i - n - 1) * v for i, v in enumerate(vals, start=1)) / (n * total)
            g_ok[b] = True
        if n >= 1 and total > 0:
            eff[b] = total ** 2 / (n * sum(v * v for v in vals))
            e_ok[b] = True
    return gini, eff, g_ok, e_ok


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------


def random_mask(rng, B, T):
    """Rows of mixed layouts: prefix, middle span, random holes, empty, single token, full."""
    mask = np.zeros((B, T), bool)
    for b in range(B):
        kind = rng.integers(6)
        if kind == 0:  # prefix
            mask[b, : rng.integers(0, T + 1)] = True
        elif kind == 1:  # span in the middle (prompt, completion, padding)
            lo = rng.integers(0, T)
            hi = rng.integers(lo, T + 1)
            mask[b, lo:hi] = True
        elif kind == 2:  # random holes
            mask[b] = rng.random(T) < rng.uniform(0.2, 0.9)
        elif kind == 3:  # empty
            pass
        elif kind == 4:  # single token anywhere
            mask[b, rng.integers(T)] = True
        else:
            mask[b] = True
    return mask


def random_inputs(rng, shape, kind):
    """Float32 inputs for every mode; ``kind`` picks the regime."""
    if kind == "normal":
        logps = -rng.exponential(2.0, shape) + rng.normal(0, 0.3, shape)  # some > 0: bad input
        ref = logps + rng.normal(0, 0.5, shape)
        ent = rng.exponential(1.5, shape)
        res = rng.exponential(1.0, shape) * (rng.random(shape) < 0.8)
    elif kind == "zeros":  # all-zero saliences in every mode: uniform (fallback or formula)
        logps = np.zeros(shape)
        ref = np.zeros(shape)
        ent = np.ones(shape)
        res = np.zeros(shape)
    elif kind == "identical":  # policy == reference, constant entropies
        logps = -rng.exponential(2.0, shape)
        ref = logps.copy()
        ent = np.full(shape, 0.7)
        res = np.zeros(shape)
    elif kind == "tiny":  # around the fallback threshold for eps=1e-3, s=2
        logps = -rng.exponential(0.02, shape)
        ref = logps + rng.normal(0, 0.02, shape)
        ent = rng.exponential(0.02, shape)
        res = rng.exponential(0.02, shape)
    elif kind == "huge":
        scale = 10.0 ** rng.uniform(20, 37, shape)
        logps = -scale * rng.random(shape)
        ref = scale * rng.random(shape)
        ent = scale * rng.random(shape)
        res = scale * rng.random(shape)
    else:
        raise AssertionError(kind)
    arrs = {"logps": logps, "ref_logps": ref, "entropies": ent, "residual_norms": res}
    return {k: np.asarray(v, np.float32) for k, v in arrs.items()}


def poison_padding(inputs, mask):
    """Put NaN / inf where the mask is 0: the module must never read them."""
    out = {}
    for i, (k, v) in enumerate(inputs.items()):
        v = np.array(v)
        v[~mask] = [np.nan, np.inf, -np.inf][i % 3]
        out[k] = v
    return out


def needed(mode, inputs):
    return {k: inputs[k] for k in REQUIRED_INPUTS[mode]}


# ---------------------------------------------------------------------------------------------
# Oracle comparison
# ---------------------------------------------------------------------------------------------


# Jitted entry points (static hyperparameters, so the Python-level branches are still taken):
# one compilation per call pattern instead of one per primitive and shape in eager mode.
TW = jax.jit(token_weights, static_argnames=("mode", "eps", "sharpening"))
NS = jax.jit(normalize_saliences, static_argnames=("eps", "sharpening"))
SAL = jax.jit(saliences, static_argnames=("mode",))
CPR = jax.jit(concentration_per_row)
CON = jax.jit(concentration)

# A pool of shapes (drawn from at random) keeps the number of XLA compilations bounded.
SHAPES = [(1, 1), (1, 17), (2, 2), (3, 5), (4, 9), (6, 12), (5, 16), (7, 3)]

# eps and sharpening traced (not static): one compilation per (mode, shape) for all their values.
_jit_weights = jax.jit(token_weights, static_argnames=("mode",))


@pytest.mark.parametrize("kind", ["normal", "zeros", "identical", "tiny", "huge"])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_token_weights_match_oracle(kind, eps):
    rng = np.random.default_rng(["normal", "zeros", "identical", "tiny", "huge"].index(kind)
                                + 100 * int(eps == 1e-3))
    for _ in range(4):
        B, T = SHAPES[rng.integers(len(SHAPES))]
        mask = random_mask(rng, B, T)
        inputs = random_inputs(rng, (B, T), kind)
        poisoned = poison_padding(inputs, mask)
        for mode, s in itertools.product(MODES, (0.5, 1.0, 2.0)):
            w = _jit_weights(mode, mask, **needed(mode, poisoned), eps=jnp.float32(eps),
                             sharpening=jnp.float32(s))
            ref = oracle_weights(mode, mask, inputs, eps, s)
            assert w.dtype == jnp.float32 and w.shape == (B, T)
            np.testing.assert_allclose(np.asarray(w), ref, rtol=2e-5, atol=1e-7,
                                       err_msg=f"{mode} {kind} eps={eps} s={s}")
            _check_rows_normalised(np.asarray(w), mask)


def _check_rows_normalised(w, mask):
    assert np.all(np.isfinite(w))
    assert np.all(w[~mask] == 0)
    assert np.all(w >= 0)
    sums = w.sum(-1)
    nonempty = mask.any(-1)
    np.testing.assert_allclose(sums[nonempty], 1.0, rtol=0, atol=2e-6)
    assert np.all(sums[~nonempty] == 0)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "uniform"])
def test_bf16_and_f16_inputs_upcast_to_float32(mode):
    rng = np.random.default_rng(7)
    mask = random_mask(rng, 5, 13)
    inputs = random_inputs(rng, (5, 13), "normal")
    for dtype in (jnp.bfloat16, jnp.float16):
        low = {k: jnp.asarray(v, dtype) for k, v in inputs.items()}
        exact = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in low.items()}
        for s in (0.5, 2.0):
            w = TW(mode, mask, **needed(mode, low), sharpening=s)
            assert w.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(w), oracle_weights(mode, mask, exact, 1e-8, s),
                                       rtol=2e-5, atol=1e-7)


def test_uniform_mode_is_one_over_valid_count_for_any_mask_dtype():
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = np.array([[1 / 3, 1 / 3, 0, 1 / 3, 0], [0] * 5, [0, 0, 1, 0, 0], [0.2] * 5])
    for m in (mask, mask.astype(bool), mask.astype(np.float32), mask.astype(np.int8)):
        w = TW("uniform", m)
        assert w.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Specific semantics
# ---------------------------------------------------------------------------------------------


def test_next_valid_index_matches_loop():
    rng = np.random.default_rng(3)
    for B, T in [(1, 1), (4, 9), (7, 23)]:
        mask = random_mask(rng, B, T)
        got = np.asarray(next_valid_index(mask))
        for b in range(B):
            for t in range(T):
                later = [k for k in range(t + 1, T) if mask[b, k]]
                assert got[b, t] == (later[0] if later else T)


def test_entropy_reduction_skips_holes_and_zeroes_last_valid_token():
    # Valid at 1, 2, 5, 7; padding entropies are garbage and must not be read.
    mask = np.array([[0, 1, 1, 0, 0, 1, 0, 1, 0]], bool)
    ent = np.array([[9.0, 3.0, 2.5, -50.0, np.nan, 1.0, 100.0, 4.0, np.inf]], np.float32)
    alpha = np.asarray(SAL("entropy_reduction", mask, entropies=ent))
    np.testing.assert_allclose(alpha, [[0, 0.5, 1.5, 0, 0, 0, 0, 0, 0]], atol=1e-7)
    # Weights of the same tokens do not depend on where the holes are.
    compact = TW("entropy_reduction", np.ones((1, 4), bool),
                            entropies=np.array([[3.0, 2.5, 1.0, 4.0]], np.float32))
    w = TW("entropy_reduction", mask, entropies=ent)
    np.testing.assert_allclose(np.asarray(w)[0, [1, 2, 5, 7]], np.asarray(compact)[0], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_holes_and_offsets_do_not_change_weights(mode):
    """Scattering a compact row into a longer one (order kept) scatters its weights."""
    rng = np.random.default_rng(11)
    n, T = 6, 15
    compact = random_inputs(rng, (1, n), "normal")
    w_compact = np.asarray(TW(mode, np.ones((1, n), bool), **needed(mode, compact),
                                         sharpening=2.0))
    for _ in range(4):
        pos = np.sort(rng.choice(T, n, replace=False))
        mask = np.zeros((1, T), bool)
        mask[0, pos] = True
        spread = {k: np.full((1, T), np.nan, np.float32) for k in compact}
        for k, v in spread.items():
            v[0, pos] = compact[k][0]
        w = np.asarray(TW(mode, mask, **needed(mode, spread), sharpening=2.0))
        np.testing.assert_allclose(w[0, pos], w_compact[0], rtol=1e-6, atol=1e-9)
        assert np.all(w[0, ~mask[0]] == 0)


@pytest.mark.parametrize("mode", ["surprisal", "divergence", "arca"])
def test_permuting_tokens_permutes_weights(mode):
    rng = np.random.default_rng(5)
    mask = random_mask(rng, 6, 12)
    inputs = random_inputs(rng, (6, 12), "normal")
    w = np.asarray(TW(mode, mask, **needed(mode, inputs), sharpening=2.0))
    perm = rng.permutation(12)
    permuted = {k: v[:, perm] for k, v in inputs.items()}
    wp = np.asarray(TW(mode, mask[:, perm], **needed(mode, permuted), sharpening=2.0))
    np.testing.assert_allclose(wp, w[:, perm], rtol=1e-6, atol=1e-9)


def test_normalize_saliences_is_permutation_equivariant():
    rng = np.random.default_rng(6)
    alpha = rng.exponential(1.0, (5, 10)).astype(np.float32)
    mask = random_mask(rng, 5, 10)
    perm = rng.permutation(10)
    w = np.asarray(NS(alpha, mask, sharpening=0.5))
    wp = np.asarray(NS(alpha[:, perm], mask[:, perm], sharpening=0.5))
    np.testing.assert_allclose(wp, w[:, perm], rtol=1e-6, atol=1e-9)


def test_fallback_compares_sharpened_sum_with_eps():
    mask = np.ones((2, 3), bool)
    alpha = np.array([[0.01, 0, 0], [0.1, 0, 0]], np.float32)
    w = np.asarray(NS(alpha, mask, eps=1e-3, sharpening=2.0))
    # Row 0: sum (alpha+eps)^2 = 1.23e-4 <= 1e-3 -> uniform although the formula would not be.
    np.testing.assert_allclose(w[0], [1 / 3] * 3, rtol=1e-6)
    # Row 1: sum = 1.0203e-2 > 1e-3 -> the formula.
    x = np.array([0.101, 0.001, 0.001]) ** 2
    np.testing.assert_allclose(w[1], x / x.sum(), rtol=1e-5)
    # Unsharpened the same row 0 is above eps, so it uses the formula.
    w1 = np.asarray(NS(alpha, mask, eps=1e-3, sharpening=1.0))
    np.testing.assert_allclose(w1[0], np.array([0.011, 0.001, 0.001]) / 0.013, rtol=1e-5)


def test_fallback_boundary_sum_equal_to_eps_is_not_above():
    # Dyadic values: alpha + eps = (0.5, 0.75) and sum (alpha + eps)^4 = 0.37890625 = eps exactly.
    eps = 0.37890625
    mask = np.ones((2, 2), bool)
    alpha = np.array([[0.12109375, 0.37109375], [0.12109375 + 2**-10, 0.37109375]], np.float32)
    w = np.asarray(NS(alpha, mask, eps=eps, sharpening=4.0))
    np.testing.assert_array_equal(w[0], [0.5, 0.5])  # sum == eps: "not above" -> uniform
    x = (alpha[1].astype(np.float64) + eps) ** 4  # sum slightly above eps -> the formula
    np.testing.assert_allclose(w[1], x / x.sum(), rtol=1e-5)


def test_negative_saliences_are_clamped_to_zero():
    mask = np.ones((1, 3), bool)
    logps = np.array([[0.5, -1.0, 2.0]], np.float32)  # positive log-probs: bad input
    w = np.asarray(TW("surprisal", mask, logps=logps))
    x = np.array([1e-8, 1.0 + 1e-8, 1e-8])
    np.testing.assert_allclose(w[0], x / x.sum(), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(SAL("surprisal", mask, logps=logps)), [[0, 1, 0]])
    w_arca = np.asarray(TW("arca", mask, residual_norms=-np.ones((1, 3), np.float32)))
    np.testing.assert_allclose(w_arca[0], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0, 4.0])
def test_huge_and_infinite_saliences_stay_finite(s):
    mask = np.array([[1, 1, 1, 1, 0]], bool)
    big = np.array([[1e30, 3e38, 1.0, 0.0, np.inf]], np.float32)
    w = np.asarray(NS(big, mask, sharpening=s))
    x = np.array([1e30, 3e38, 1.0, 1e-8], np.float64) ** s
    np.testing.assert_allclose(w[0, :4], x / x.sum(), rtol=1e-5, atol=1e-30)
    assert w[0, 4] == 0
    # +inf at valid positions counts as the float32 maximum: the inf tokens share the weight.
    inf_row = np.array([[np.inf, 5.0, np.inf, 0.0]], np.float32)
    w_inf = np.asarray(NS(inf_row, np.ones((1, 4), bool), sharpening=s))
    assert np.all(np.isfinite(w_inf))
    np.testing.assert_allclose(w_inf[0], [0.5, 0, 0.5, 0], atol=1e-7)


def test_nan_at_a_valid_position_shows_in_its_row_only():
    mask = np.ones((2, 3), bool)
    res = np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]], np.float32)
    w = np.asarray(TW("arca", mask, residual_norms=res))
    assert np.all(np.isnan(w[0]))
    np.testing.assert_allclose(w[1], np.array([1, 2, 3]) / 6, rtol=1e-6)
    for s in (0.5, 2.0):  # also through the pow paths, and with the NaN as the row maximum
        w2 = np.asarray(TW("arca", np.array([[1, 1, 0]], bool), sharpening=s,
                                      residual_norms=np.array([[np.nan, 0.0, 5.0]], np.float32)))
        assert np.all(np.isnan(w2[0, :2])) and w2[0, 2] == 0
    rows = CPR(w, mask)
    assert np.isnan(np.asarray(rows.gini)[0])
    assert np.isnan(np.asarray(rows.effective_token_ratio)[0])
    assert np.all(np.isfinite(np.asarray(rows.gini)[1:]))
    assert np.isnan(float(CON(w, mask).gini))


def test_empty_and_single_token_rows():
    mask = np.array([[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], bool)
    for mode in MODES:
        inputs = random_inputs(np.random.default_rng(0), mask.shape, "normal")
        for s in (0.5, 1.0, 2.0):
            w = np.asarray(TW(mode, mask, **needed(mode, inputs), sharpening=s))
            np.testing.assert_array_equal(w, mask.astype(np.float32))


@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_gradients_are_finite(eps, s):
    """Weights are meant to be stop_gradient'ed, but differentiating must not produce NaN."""
    mask = np.array([[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]], bool)
    res = np.array([[np.nan, 1, 2, 3], [0, 0, 0, 9], [1e30, 3e38, 1, 0], [5, 0, 7, 0],
                    [0, 1, 1, 1]], np.float32)
    c = np.random.default_rng(1).normal(size=mask.shape).astype(np.float32)

    def f(r):
        return jnp.sum(TW("arca", mask, residual_norms=r, eps=eps, sharpening=s) * c)

    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(res)))
    assert np.all(np.isfinite(g)), g
    assert np.all(g[~mask] == 0)

    def h(ent):
        return jnp.sum(TW("entropy_reduction", mask, entropies=ent, eps=eps, sharpening=s) * c)

    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(h))(jnp.asarray(res)))))

    def k(w):
        rows = CPR(w, mask)
        return jnp.sum(rows.gini) + jnp.sum(rows.effective_token_ratio)

    w = TW("arca", mask, residual_norms=jnp.nan_to_num(res), eps=eps, sharpening=s)
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(k))(w))))


# ---------------------------------------------------------------------------------------------
# Errors and the mode table
# ---------------------------------------------------------------------------------------------


def test_mode_table():
    assert MODES == ("uniform", "surprisal", "entropy_reduction", "divergence", "arca")
    assert tuple(REQUIRED_INPUTS) == MODES
    assert REQUIRED_INPUTS["divergence"] == ("logps", "ref_logps")
    assert required_inputs("arca") == ("residual_norms",)
    assert set().union(*REQUIRED_INPUTS.values()) == set(INPUT_NAMES)
    with pytest.raises(TypeError):
        REQUIRED_INPUTS["uniform"] = ("logps",)  # read-only


@pytest.mark.parametrize("mode", MODES)
def test_required_inputs_are_exactly_what_the_mode_needs(mode):
    mask = np.ones((2, 3), bool)
    full = random_inputs(np.random.default_rng(2), (2, 3), "normal")
    token_weights(mode, mask, **needed(mode, full))  # sufficient
    for name in REQUIRED_INPUTS[mode]:  # each one necessary, and named when missing
        partial = {k: v for k, v in needed(mode, full).items() if k != name}
        with pytest.raises(ValueError, match=rf"{mode}.*\b{name}\b"):
            token_weights(mode, mask, **partial)


def test_missing_inputs_are_all_named():
    with pytest.raises(ValueError) as info:
        token_weights("divergence", np.ones((1, 2), bool))
    assert "logps" in str(info.value) and "ref_logps" in str(info.value)


def test_unknown_mode_lists_valid_modes():
    for bad in ("arca2", "", "Uniform", None):
        with pytest.raises(ValueError) as info:
            token_weights(bad, np.ones((1, 2), bool))
        for mode in MODES:
            assert mode in str(info.value)
    with pytest.raises(ValueError, match="unknown"):
        required_inputs("kl")


def test_bad_shapes_and_hyperparameters_raise():
    mask = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="residual_norms has shape"):
        token_weights("arca", mask, residual_norms=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="sharpening"):
        token_weights("arca", mask, residual_norms=np.ones((2, 3), np.float32), sharpening=0.0)
    with pytest.raises(ValueError, match="eps"):
        token_weights("arca", mask, residual_norms=np.ones((2, 3), np.float32), eps=-1e-8)
    with pytest.raises(ValueError, match="weights has shape"):
        concentration(np.ones((2, 4), np.float32), mask)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_concentration_matches_oracle():
    rng = np.random.default_rng(13)
    for trial in range(16):
        B, T = SHAPES[rng.integers(len(SHAPES))]
        mask = random_mask(rng, B, T)
        if trial % 3 == 0:  # unnormalised, with exact zeros
            w = (rng.exponential(2.0, (B, T)) * (rng.random((B, T)) < 0.7)).astype(np.float32)
        else:
            inputs = random_inputs(rng, (B, T), "normal")
            mode = MODES[trial % len(MODES)]
            w = np.asarray(_jit_weights(mode, mask, **needed(mode, inputs),
                                        eps=jnp.float32(1e-8), sharpening=jnp.float32(2.0)))
        w_poisoned = np.where(mask, w, np.float32(np.nan))  # never read off the mask
        rows = CPR(w_poisoned, mask)
        g, e, g_ok, e_ok = oracle_concentration_rows(w, mask)
        np.testing.assert_array_equal(np.asarray(rows.gini_valid), g_ok)
        np.testing.assert_array_equal(np.asarray(rows.effective_token_ratio_valid), e_ok)
        np.testing.assert_allclose(np.asarray(rows["gini"]), g, atol=2e-6)
        np.testing.assert_allclose(np.asarray(rows["effective_token_ratio"]), e, rtol=1e-5)
        c = CON(w_poisoned, mask)
        assert int(c["gini_rows"]) == g_ok.sum()
        assert int(c["effective_token_ratio_rows"]) == e_ok.sum()
        np.testing.assert_allclose(float(c["gini"]), g[g_ok].mean() if g_ok.any() else 0.0,
                                   atol=2e-6)
        np.testing.assert_allclose(float(c["effective_token_ratio"]),
                                   e[e_ok].mean() if e_ok.any() else 1.0, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_concentration_extremes(n):
    T = n + 5
    rng = np.random.default_rng(n)
    pos = np.sort(rng.choice(T, n, replace=False))
    mask = np.zeros((2, T), bool)
    mask[:, pos] = True
    w = np.zeros((2, T), np.float32)
    w[0, pos] = 1.0 / n  # uniform
    w[1, pos[rng.integers(n)]] = 1.0  # one-hot
    rows = CPR(w, mask)
    np.testing.assert_allclose(np.asarray(rows.effective_token_ratio), [1.0, 1.0 / n], rtol=1e-6)
    if n >= 2:
        np.testing.assert_allclose(np.asarray(rows.gini), [0.0, (n - 1) / n], atol=1e-6)
        assert np.asarray(rows.gini_valid).all()
    else:
        assert not np.asarray(rows.gini_valid).any()
        np.testing.assert_array_equal(np.asarray(rows.gini), [0.0, 0.0])
    u = CON(TW("uniform", mask), mask)
    np.testing.assert_allclose([float(u["gini"]), float(u["effective_token_ratio"])], [0.0, 1.0],
                               atol=1e-6)


def test_concentration_skips_ineligible_rows_and_handles_empty_batches():
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    w = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    c = CON(w, mask)
    # Gini: row 0 only (row 1 has one token, row 2 none, row 3 zero total weight).
    assert float(c.gini) == pytest.approx(0.5)
    assert int(c.gini_rows) == 1
    # EffN/T: rows 0 (1/2) and 1 (1).
    assert float(c.effective_token_ratio) == pytest.approx(0.75)
    assert int(c.effective_token_ratio_rows) == 2
    empty = CON(np.zeros((3, 5), np.float32), np.zeros((3, 5), bool))
    assert (float(empty.gini), float(empty.effective_token_ratio)) == (0.0, 1.0)
    assert (int(empty.gini_rows), int(empty.effective_token_ratio_rows)) == (0, 0)


def test_result_structs_are_frozen_pytrees_with_key_access():
    mask = np.ones((3, 4), bool)
    c = CON(TW("uniform", mask), mask)
    assert set(dict(c)) == {"gini", "effective_token_ratio", "gini_rows",
                            "effective_token_ratio_rows"}
    assert c["gini"] is c.gini
    with pytest.raises(KeyError):
        c["entropy"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.gini = 1.0
    assert len(jax.tree_util.tree_leaves(c)) == 4
    rows = CPR(TW("uniform", mask), mask)
    assert rows["gini_valid"].shape == (3,) and rows["gini_valid"].dtype == jnp.bool_


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, pmap, sharding
# ---------------------------------------------------------------------------------------------


def _case(seed=21, B=8, T=11):
    rng = np.random.default_rng(seed)
    return random_mask(rng, B, T), random_inputs(rng, (B, T), "normal")


@pytest.mark.parametrize("mode", MODES)
def test_jit_matches_eager(mode):
    mask, inputs = _case()
    eager = token_weights(mode, mask, **needed(mode, inputs), sharpening=2.0)
    jitted = jax.jit(token_weights, static_argnames=("mode", "eps", "sharpening"))
    w = jitted(mode, mask, **needed(mode, inputs), sharpening=2.0)
    np.testing.assert_allclose(np.asarray(w), np.asarray(eager), rtol=1e-6, atol=1e-9)
    c_eager = concentration(eager, mask)
    c_jit = jax.jit(concentration)(w, mask)
    assert c_eager.keys() == ("gini", "effective_token_ratio", "gini_rows",
                              "effective_token_ratio_rows")
    for k in c_eager:
        np.testing.assert_allclose(np.asarray(c_jit[k]), np.asarray(c_eager[k]), rtol=1e-6)


@pytest.mark.parametrize("mode", ["entropy_reduction", "divergence"])
def test_vmap_over_rows_and_extra_batch_axes(mode):
    mask, inputs = _case(B=6)
    args = needed(mode, inputs)
    batched = np.asarray(TW(mode, mask, **args, sharpening=0.5))

    def one_row(m, *vals):
        return token_weights(mode, m, **dict(zip(args, vals)), sharpening=0.5)

    per_row = jax.jit(jax.vmap(one_row))(mask, *args.values())
    np.testing.assert_allclose(np.asarray(per_row), batched, rtol=1e-6, atol=1e-9)
    # Extra leading axis ([2, 3, T]) through the function directly and through vmap.
    m3 = mask.reshape(2, 3, -1)
    a3 = {k: v.reshape(2, 3, -1) for k, v in args.items()}
    np.testing.assert_allclose(np.asarray(TW(mode, m3, **a3, sharpening=0.5)),
                               batched.reshape(2, 3, -1), rtol=1e-6, atol=1e-9)
    rows = jax.jit(jax.vmap(concentration_per_row))(jnp.asarray(batched), mask)
    direct = CPR(batched, mask)
    np.testing.assert_allclose(np.asarray(rows.gini), np.asarray(direct.gini), atol=1e-7)


def test_pmap_matches_single_device():
    n_dev = jax.local_device_count()
    assert n_dev == 8  # tests/conftest.py forces 8 host devices
    mask, inputs = _case(B=16)
    f = functools.partial(token_weights, "arca", sharpening=2.0)
    expected = np.asarray(TW("arca", mask, residual_norms=inputs["residual_norms"], sharpening=2.0))
    got = jax.pmap(lambda m, r: f(m, residual_norms=r))(
        mask.reshape(n_dev, 2, -1), inputs["residual_norms"].reshape(n_dev, 2, -1))
    np.testing.assert_allclose(np.asarray(got).reshape(16, -1), expected, rtol=1e-6, atol=1e-9)
    rows = jax.pmap(concentration_per_row)(jnp.asarray(expected).reshape(n_dev, 2, -1),
                                           mask.reshape(n_dev, 2, -1))
    direct = CPR(expected, mask)
    np.testing.assert_allclose(np.asarray(rows.gini).reshape(-1), np.asarray(direct.gini),
                               atol=1e-7)


def test_sharded_inputs_under_jit():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    mask, inputs = _case(B=16)
    put = lambda x: jax.device_put(jnp.asarray(x), sharding)

    @jax.jit
    def step(m, lp, ent):
        w_div = token_weights("surprisal", m, logps=lp, sharpening=2.0)
        w_ent = token_weights("entropy_reduction", m, entropies=ent)
        return w_div, w_ent, concentration(w_div, m)

    w_div, w_ent, c = step(put(mask), put(inputs["logps"]), put(inputs["entropies"]))
    np.testing.assert_allclose(
        np.asarray(w_div), np.asarray(TW("surprisal", mask, logps=inputs["logps"],
                                                    sharpening=2.0)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        np.asarray(w_ent),
        np.asarray(TW("entropy_reduction", mask, entropies=inputs["entropies"])),
        rtol=1e-6, atol=1e-9)
    expected = CON(np.asarray(w_div), mask)
    np.testing.assert_allclose(float(c.gini), float(expected.gini), rtol=1e-5)
    np.testing.assert_allclose(float(c.effective_token_ratio),
                               float(expected.effective_token_ratio), rtol=1e-5)


def test_module_has_no_python_row_loop_dependency_on_batch_size():
    """Tracing is batch-size independent: the jaxpr has the same equations for B=1 and B=64."""
    def eqns(B):
        m = jax.ShapeDtypeStruct((B, 9), jnp.bool_)
        x = jax.ShapeDtypeStruct((B, 9), jnp.float32)
        fn = functools.partial(token_weights, "entropy_reduction")
        jaxpr = jax.make_jaxpr(lambda m, x: fn(m, entropies=x))(m, x)
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    assert eqns(1) == eqns(64)
