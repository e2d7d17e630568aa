"""Token weightings as an extension point: the registry in ``arca_jax.credit``, a user's weighting
(ARCA x surprisal) through ``token_weights``, the salience pipeline (``all_method_weights``),
``loss_fn`` and the forwards it runs, and ``grpo.weighting: module:attribute`` in the config."""

import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import config as run_config
from arca_jax import credit, diagnostics, lora
from arca_jax.configlib import ConfigError
from arca_jax.grpo import (Batch, GRPOConfig, all_method_weights, completion_valid,
                           forwards_needed, loss_fn, policy_logprobs, token_signals)
from arca_jax.grpo.signals import policy_hidden
from fixtures import random_adapter, random_params, tiny_config

CFG = tiny_config()
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
FAST = {"xla_backend_optimization_level": 0}
EPS = 1e-8
USER = "test_registry_arca_x_surprisal"


def arca_x_surprisal(residual_norms, logps):
    return residual_norms * -logps


def position_ramp(mask):
    """A weighting that reads only the mask: later tokens count more (1, 2, 3, ... per row)."""
    return jnp.cumsum(mask, axis=-1).astype(jnp.float32)


@pytest.fixture
def user():
    w = credit.register(USER, needs=("residual_norms", "logps"))(arca_x_surprisal)
    yield w
    credit.unregister(USER)


@pytest.fixture(scope="module")
def model():
    params, tree = jax.jit(lambda: (random_params(CFG, seed=0, scale=2.0),
                                    random_adapter(CFG, LCFG, seed=1, scale=0.3)))()
    B, T = 6, 11
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b, n in enumerate([5, 1, 3, 6, 0, 2]):  # ragged, one empty row
        cm[b, 4:4 + n] = 1
        am[b, 4 + n:] = 0
    cm[3, 6] = 0  # a hole
    batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                  completion_mask=jnp.asarray(cm),
                  advantages=jnp.asarray(rng.normal(size=B).astype(np.float32)))
    return params, tree, batch


def np_weights(alpha, valid, eps=EPS, s=1.0):
    """The paper's normalisation in numpy: (alpha + eps)^s / sum over the row's valid tokens,
    uniform when that sum is not above eps."""
    alpha = np.where(valid, np.clip(np.asarray(alpha, np.float64), 0, None), 0.0)
    out = np.zeros_like(alpha)
    for b in range(alpha.shape[0]):
        idx = np.flatnonzero(valid[b])
        if len(idx) == 0:
            continue
        num = (alpha[b, idx] + eps) ** s
        out[b, idx] = num / num.sum() if num.sum() > eps else 1.0 / len(idx)
    return out


# ------------------------------------ the registry --------------------------------------------


def test_builtins_are_registered_and_tables_derive_from_the_registry():
    assert credit.registered()[:5] == credit.MODES
    assert credit.MODES == ("uniform", "surprisal", "entropy_reduction", "divergence", "arca")
    for m in credit.MODES:
        w = credit.get(m)
        assert isinstance(w, credit.Weighting) and w.name == m
        assert credit.REQUIRED_INPUTS[m] == credit.required_inputs(m) == w.inputs
    assert credit.get("entropy_reduction").needs == ("entropies", "mask")
    assert credit.REQUIRED_INPUTS["entropy_reduction"] == ("entropies",)  # the mask is positional


def test_register_get_and_unregister(user):
    assert isinstance(user, credit.Weighting) and user.name == USER
    assert credit.get(USER) is user and credit.get(user) is user
    assert credit.registered()[-1] == USER and USER not in credit.MODES
    assert credit.required_inputs(USER) == ("residual_norms", "logps")
    assert hash(GRPOConfig(weighting=USER)) == hash(GRPOConfig(weighting=USER))
    with pytest.raises(ValueError, match="already registered"):
        credit.register(USER, needs=("logps",), fn=lambda logps: -logps)
    other = credit.register(USER, needs=("logps",), fn=lambda logps: -logps, replace=True)
    assert credit.get(USER) is other
    credit.register(USER, needs=("residual_norms", "logps"), fn=arca_x_surprisal, replace=True)


def test_registry_rejects_bad_declarations():
    for name in credit.MODES:
        with pytest.raises(ValueError, match="cannot be replaced"):
            credit.register(name, needs=("logps",), fn=lambda logps: -logps, replace=True)
        with pytest.raises(ValueError, match="cannot be removed"):
            credit.unregister(name)
    with pytest.raises(ValueError, match="signals"):
        credit.Weighting("bad", lambda hidden: hidden, ("hidden",))
    with pytest.raises(ValueError, match="signals"):
        credit.Weighting("bad", lambda logps: logps, ("logps", "logps"))
    with pytest.raises(ValueError, match="':'"):
        credit.Weighting("a:b", lambda logps: logps, ("logps",))
    with pytest.raises(ValueError, match="callable"):
        credit.Weighting("bad", 3, ("logps",))
    with pytest.raises(KeyError):
        credit.unregister("never_registered")
    for bad in ("nope", "", None, 3, "no_such_module_xyz:fn", "arca_jax.credit:nothing",
                "arca_jax.credit:MODES"):
        with pytest.raises(ValueError):
            credit.get(bad)
        with pytest.raises(ValueError):
            GRPOConfig(weighting=bad)


def test_import_path_must_name_a_weighting():
    with pytest.raises(ValueError, match="not a credit.Weighting"):
        credit.get("arca_jax.credit:get")  # a function without declared signals
    with pytest.raises(ValueError, match="no attribute"):
        credit.get("arca_jax.credit:no_such_weighting")


# ------------------------------- a user weighting's weights -----------------------------------


def test_user_weighting_token_weights_against_numpy(user):
    rng = np.random.default_rng(3)
    B, T = 5, 9
    valid = rng.random((B, T)) < 0.7
    valid[0] = False  # empty row
    valid[1] = False
    valid[1, 4] = True  # one token
    logps = -rng.exponential(1.5, (B, T)).astype(np.float32)
    res = rng.exponential(1.0, (B, T)).astype(np.float32)
    res[2] = 0.0  # zero salience row: the uniform fallback
    logps_pad = np.where(valid, logps, np.nan)  # padding is never read
    for s in (1.0, 2.0):
        for mode in (USER, user):
            got = jax.jit(lambda lp, r, m=mode, s=s: credit.token_weights(
                m, valid, logps=lp, residual_norms=r, eps=EPS, sharpening=s))(logps_pad, res)
            want = np_weights(res * -logps, valid, s=s)
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-7)
    # the diagnostics apply as to the paper's weightings
    w = credit.token_weights(USER, valid, logps=logps, residual_norms=res)
    c = diagnostics.concentration(w, valid)
    assert 0 < float(c.gini) < 1 and 0 < float(c.effective_token_ratio) < 1
    with pytest.raises(ValueError, match="logps"):
        credit.token_weights(USER, valid, residual_norms=res)


def test_mask_only_weighting_and_output_shape_check():
    ramp = credit.Weighting("ramp", position_ramp, ("mask",))
    valid = np.array([[0, 1, 1, 1, 0], [1, 0, 1, 0, 0]], bool)
    got = np.asarray(credit.token_weights(ramp, valid, eps=0.0))
    np.testing.assert_allclose(got, [[0, 1 / 6, 2 / 6, 3 / 6, 0], [1 / 3, 0, 2 / 3, 0, 0]],
                               rtol=1e-6)
    assert credit.required_inputs(ramp) == ()
    bad = credit.Weighting("bad_shape", lambda logps: logps[:, :1], ("logps",))
    with pytest.raises(ValueError, match="returned saliences of shape"):
        credit.token_weights(bad, valid, logps=np.zeros(valid.shape, np.float32))


# ------------------------------- through the salience pipeline --------------------------------


def test_user_weighting_in_all_method_weights_and_loss_fn(model, user):
    params, tree, batch = model
    g = GRPOConfig(weighting=USER, sharpening=2.0)
    methods = credit.MODES + (USER,)
    weights = jax.jit(all_method_weights,
                      static_argnames=("config", "lora_scale", "grpo_config", "methods"))(
        tree, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g, methods=methods)
    assert set(weights) == set(methods)

    # the signals, as the loss sees them: numpy builds ARCA x surprisal's weights from them
    valid = completion_valid(batch)
    h = policy_hidden(tree, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g)
    sig = token_signals(params, batch, valid, h, config=CFG, grpo_config=g,
                        need=frozenset({"logps", "residual_norms"}))
    v = np.asarray(valid)
    want = np_weights(np.asarray(sig.residual_norms) * -np.asarray(sig.logps), v, s=2.0)
    np.testing.assert_allclose(np.asarray(weights[USER]), want, rtol=1e-5, atol=1e-7)
    assert np.asarray(sig.residual_norms)[v].min() > 0  # the adapter moves every position

    # loss_fn with the user weighting: the paper's -mean_b A_b sum_t w_bt log pi(y_bt)
    loss, stats = jax.jit(lambda t: loss_fn(t, params, batch, config=CFG,
                                            lora_scale=LCFG.scaling, grpo_config=g),
                          compiler_options=FAST)(tree)
    logps = np.asarray(policy_logprobs(tree, params, batch, config=CFG, lora_scale=LCFG.scaling))
    adv = np.asarray(batch.advantages)
    rows = v.any(1)
    want_loss = -np.sum(adv[:, None] * want * np.where(v, logps, 0.0)) / rows.sum()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    rc = diagnostics.concentration_per_row(jnp.asarray(want, jnp.float32), valid)
    np.testing.assert_allclose(float(stats.gini_sum), float(jnp.sum(rc.gini)), rtol=1e-4)
    assert float(stats.residual_sum) > 0  # ARCA's residuals were computed and logged


def test_only_the_forwards_a_user_weighting_needs_run(user):
    ramp = "test_registry_ramp"
    credit.register(ramp, needs=("mask",), fn=position_ramp)
    surpr = "test_registry_neg_logp"
    credit.register(surpr, needs=("logps",), fn=lambda logps: -logps)
    try:
        assert forwards_needed(GRPOConfig(weighting=ramp)) == ("policy",)
        assert forwards_needed(GRPOConfig(weighting=surpr)) == ("policy",)
        assert forwards_needed(GRPOConfig(weighting=USER)) == ("policy", "base")
        assert forwards_needed(GRPOConfig(weighting=surpr, kl_beta=0.1)) == ("policy", "base")
    finally:
        credit.unregister(ramp)
        credit.unregister(surpr)


# ------------------------------- grpo.weighting: module:attribute -----------------------------


@pytest.fixture
def weighting_module(tmp_path, monkeypatch):
    name = "my_test_weightings"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        from arca_jax import credit

        def _arca_x_surprisal(residual_norms, logps):
            return residual_norms * -logps

        # a Weighting without registering it: reachable by its import path only
        arca_x_surprisal = credit.Weighting("arca_x_surprisal_unregistered", _arca_x_surprisal,
                                            ("residual_norms", "logps"))
        not_a_weighting = _arca_x_surprisal
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_config_resolves_an_import_path(weighting_module):
    path = f"{weighting_module}:arca_x_surprisal"
    cfg = run_config.load(None, [f"grpo.weighting={path}", "grpo.sharpening=2.0"])
    assert cfg.grpo.weighting == path  # the string stays: what config.yaml and the logs keep
    w = credit.get(path)
    assert w is sys.modules[weighting_module].arca_x_surprisal
    assert credit.required_inputs(path) == ("residual_norms", "logps")
    assert forwards_needed(cfg.grpo) == ("policy", "base")
    assert path not in credit.registered()
    valid = np.array([[1, 1, 0]], bool)
    got = credit.token_weights(path, valid, logps=np.log([[0.5, 0.25, 1.0]]).astype(np.float32),
                               residual_norms=np.array([[1.0, 1.0, 5.0]], np.float32), eps=0.0)
    np.testing.assert_allclose(np.asarray(got), [[1 / 3, 2 / 3, 0]], rtol=1e-6)

    for bad, msg in ((f"{weighting_module}:not_a_weighting", "not a credit.Weighting"),
                     (f"{weighting_module}:missing", "no attribute"),
                     ("no_such_module_for_arca:fn", "cannot import"),
                     ("not_registered_anywhere", "valid modes")):
        with pytest.raises(ConfigError, match=msg) as info:
            run_config.load(None, [f"grpo.weighting={bad}"])
        assert "grpo" in str(info.value)
