"""ARCA variants from the same two forwards: ``grpo.arca_layers`` (the residual at decoder layer
outputs, averaged over the chosen layers) and ``grpo.arca_relative`` (divided by ||h_base||).

The oracle is independent of our scan: a transformers Qwen3 with a PEFT adapter, each decoder
layer's output captured by a forward hook (adapter on, then off with ``disable_adapter``), the
final hidden state from ``output_hidden_states``; residuals, the noise floor, the alignment (token
t scored at t - 1) and the weights (a + eps)^s / sum in numpy loops. Then the loss statistics
(per-layer residual means) and the train step in jit / pmap / mesh with microbatches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arca_jax import config as run_config
from arca_jax import lora, qwen3
from arca_jax.grpo import (Batch, GRPOConfig, TrainState, all_method_weights, loss_fn, make_mesh,
                           make_train_step, replicate, shard_params, unreplicate)
from arca_jax.grpo.signals import residual_layer_count, residual_layers
from fixtures import (grad_recorder, peft_case, positions_of, ragged_batch, random_adapter,
                      random_params, rel_err, tiny_config)

FAST = {"xla_backend_optimization_level": 0}
R, ALPHA = 4, 8.0
LAYERS = 3


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    case = peft_case(layers=LAYERS, seed=13, path=tmp_path_factory.mktemp("arca"), r=R,
                     alpha=ALPHA)
    batch = Batch(input_ids=jnp.asarray(case.ids, jnp.int32),
                  attention_mask=jnp.asarray(case.attention_mask),
                  completion_mask=jnp.asarray(case.completion_mask),
                  advantages=jnp.asarray(case.advantages))
    return case.pm, case.config, case.params, case.tree, batch


def torch_states(pm, batch, adapter: bool):
    """(per-layer outputs [L, B, T, D], final hidden [B, T, D]) float64, from forward hooks on
    the decoder layers of the transformers model."""
    ids = torch.as_tensor(np.asarray(batch.input_ids, np.int64))
    am = torch.as_tensor(np.asarray(batch.attention_mask, np.int64))
    captured = []

    def hook(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    layers = pm.base_model.model.model.layers
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            kw = dict(input_ids=ids, attention_mask=am,
                      position_ids=torch.as_tensor(positions_of(am.numpy())),
                      output_hidden_states=True)
            if adapter:
                out = pm(**kw)
            else:
                with pm.disable_adapter():
                    out = pm(**kw)
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == len(layers)
    return (np.stack([c.numpy() for c in captured]).astype(np.float64),
            out.hidden_states[-1].numpy().astype(np.float64))


def numpy_arca_weights(pm, batch, layers, relative, *, sharpening=2.0, eps=1e-8,
                       noise_floor=1e-5):
    """ARCA's weights [B, T] and per-layer residuals [S, B, T] (aligned with input_ids) from the
    paper's definitions, in loops over rows and tokens."""
    on_layers, on_final = torch_states(pm, batch, True)
    off_layers, off_final = torch_states(pm, batch, False)
    if layers == "final":
        pol, base = on_final[None], off_final[None]
    else:
        idx = list(range(LAYERS)) if layers == "all" else list(layers)
        pol, base = on_layers[idx], off_layers[idx]
    S = pol.shape[0]
    valid = (np.asarray(batch.completion_mask) * np.asarray(batch.attention_mask)) == 1
    valid[:, 0] = False
    B, T = valid.shape
    per_layer = np.zeros((S, B, T))
    for s in range(S):
        for b in range(B):
            for t in range(1, T):
                if not valid[b, t]:
                    continue
                d = np.linalg.norm(pol[s, b, t - 1] - base[s, b, t - 1])
                nb = np.linalg.norm(base[s, b, t - 1])
                d = d if d > noise_floor * nb else 0.0
                per_layer[s, b, t] = (d / nb if nb > 0 else 0.0) if relative else d
    alpha = per_layer.mean(0)
    W = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if valid[b, t]]
        if not idx:
            continue
        num = {t: (alpha[b, t] + eps) ** sharpening for t in idx}
        tot = sum(num.values())
        for t in idx:
            W[b, t] = num[t] / tot if tot > eps else 1.0 / len(idx)
    return W, per_layer, valid


def test_forward_layers_match_transformers_hooks(oracle):
    """forward(return_layers=True).layers equals each decoder layer's output in transformers,
    with and without the adapter, for einsum attention and the rotated "sdpa-xla" layout; the
    default forward is unchanged."""
    pm, config, params, tree, batch = oracle
    f = jax.jit(qwen3.forward, static_argnames=("config", "return_layers", "attention",
                                                "return_logits", "lora_scale"))
    mask = np.asarray(batch.attention_mask, bool)
    for adapter in (False, True):
        want, want_final = torch_states(pm, batch, adapter)
        for attention in ("einsum", "sdpa-xla"):
            out = f(params, batch.input_ids, config=config, attention_mask=batch.attention_mask,
                    lora=tree if adapter else None, lora_scale=ALPHA / R, return_logits=False,
                    attention=attention, return_layers=True)
            assert out.layers.shape == (LAYERS,) + tuple(out.hidden.shape)
            for i in range(LAYERS):
                assert rel_err(out.layers[i], want[i], mask) < 1e-4, (adapter, attention, i)
            assert rel_err(out.hidden, want_final, mask) < 1e-4
    plain = f(params, batch.input_ids, config=config, attention_mask=batch.attention_mask,
              return_logits=False, attention="einsum")
    assert plain.layers is None


CASES = [("final", True), ("all", False), ((0, 2), False), ((1,), True), ("all", True)]


@pytest.mark.parametrize("layers,relative", CASES, ids=lambda v: str(v))
def test_variant_weights_and_layer_means_match_the_oracle(oracle, layers, relative):
    pm, config, params, tree, batch = oracle
    g = GRPOConfig(weighting="arca", sharpening=2.0, arca_layers=layers, arca_relative=relative)
    want_w, want_layers, valid = numpy_arca_weights(pm, batch, layers, relative)
    w = jax.jit(all_method_weights, static_argnames=("config", "lora_scale", "grpo_config",
                                                     "methods"))(
        tree, params, batch, config=config, lora_scale=ALPHA / R, grpo_config=g,
        methods=("arca",))["arca"]
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=2e-4, atol=1e-6)
    assert np.all(want_layers[:, valid] > 0)  # the adapter moves every measured layer
    # the loss's statistics: per-layer means over completion tokens, and their mean
    (_, stats) = jax.jit(loss_fn, static_argnames=("config", "lora_scale", "grpo_config"),
                         compiler_options=FAST)(tree, params, batch, config=config,
                                                lora_scale=ALPHA / R, grpo_config=g)
    m = stats.metrics()
    want_means = want_layers[:, valid].mean(1)
    np.testing.assert_allclose(np.asarray(m["residual_norm_layers"]), want_means, rtol=2e-4)
    np.testing.assert_allclose(float(m["residual_norm_mean"]), want_means.mean(), rtol=2e-4)
    if layers != "final":  # a different salience from the paper's final-state residual
        paper_w, _, _ = numpy_arca_weights(pm, batch, "final", False)
        assert np.abs(paper_w - want_w).max() > 1e-3


def test_default_is_the_papers_final_state(oracle):
    """arca_layers "final" without relative is the paper's residual: identical weights to the
    defaults, and one per-layer mean equal to residual_norm_mean."""
    pm, config, params, tree, batch = oracle
    assert GRPOConfig() == GRPOConfig(arca_layers="final", arca_relative=False)
    want_w, want_layers, valid = numpy_arca_weights(pm, batch, "final", False)
    g = GRPOConfig(weighting="arca", sharpening=2.0)
    _, stats = jax.jit(loss_fn, static_argnames=("config", "lora_scale", "grpo_config"),
                       compiler_options=FAST)(tree, params, batch, config=config,
                                              lora_scale=ALPHA / R, grpo_config=g)
    m = stats.metrics()
    assert m["residual_norm_layers"].shape == (1,)
    assert float(m["residual_norm_layers"][0]) == pytest.approx(float(m["residual_norm_mean"]),
                                                                rel=1e-6)
    np.testing.assert_allclose(float(m["residual_norm_mean"]), want_layers[0, valid].mean(),
                               rtol=2e-4)


def _layer_scans(jaxpr, length: int) -> int:
    """Scans over `length` steps (the decoder layers' lax.scan) in a jaxpr, nested ones included."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == length:
            n += 1
        for v in eqn.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    n += _layer_scans(inner, length)
    return n


@pytest.mark.parametrize("layers,relative,kl_beta", [("all", False, 0.0), ((1,), True, 0.1)])
def test_variants_run_the_same_two_forwards(oracle, layers, relative, kl_beta):
    """No extra pass: the gradient forward and one base forward, as for the paper's ARCA."""
    pm, config, params, tree, batch = oracle
    g = GRPOConfig(weighting="arca", arca_layers=layers, arca_relative=relative, kl_beta=kl_beta,
                   scan_layers=True)  # one layer scan per forward
    jaxpr = jax.make_jaxpr(lambda t: loss_fn(t, params, batch, config=config,
                                             lora_scale=ALPHA / R, grpo_config=g))(tree)
    assert _layer_scans(jaxpr.jaxpr, LAYERS) == 2


def test_settings_are_validated():
    assert GRPOConfig(arca_layers=[2, 0]).arca_layers == (0, 2)  # a YAML list: sorted tuple
    hash(GRPOConfig(arca_layers=[1]))
    for bad in ("last", [], [0, 0], [-1], [True], [1.5]):
        with pytest.raises(ValueError, match="arca_layers"):
            GRPOConfig(arca_layers=bad)
    with pytest.raises(ValueError, match="arca_relative"):
        GRPOConfig(arca_relative=1)
    g = GRPOConfig(arca_layers=[0, 3])
    with pytest.raises(ValueError, match="3 decoder layers"):
        residual_layers(g, 3)
    assert residual_layers(GRPOConfig(arca_layers="all"), 3) == (0, 1, 2)
    assert residual_layer_count(GRPOConfig(), 3) == 1
    cfg = run_config.load(None, ["grpo.arca_layers=[1, 0]", "grpo.arca_relative=true"])
    assert cfg.grpo.arca_layers == (0, 1) and cfg.grpo.arca_relative
    assert run_config.load(None, ["grpo.arca_layers=all"]).grpo.arca_layers == "all"
    with pytest.raises(run_config.ConfigError, match="arca_layers"):
        run_config.load(None, ["grpo.arca_layers=3"])


# ------------------------------------ the train step ------------------------------------------

CFG = tiny_config(vocab_size=60, tie_word_embeddings=True, num_hidden_layers=LAYERS)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)



@pytest.mark.slow
def test_train_step_jit_microbatches_pmap_mesh_agree():
    """Layered, relative ARCA with a KL term (the base forward serves both): gradients,
    loss and the per-layer residual means equal in jit, jit with 2 microbatches, pmap and an
    8-device mesh."""
    params, tree = jax.jit(lambda: (random_params(CFG, seed=0, scale=2.0),
                                    random_adapter(CFG, LCFG, seed=1, scale=0.2)))()
    batch = ragged_batch(CFG.vocab_size)
    g = GRPOConfig(weighting="arca", sharpening=2.0, arca_layers=(0, 2), arca_relative=True,
                   kl_beta=0.05, loss_aggregation="token_mean")
    opt = grad_recorder()
    (loss, stats), grads = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g),
        has_aux=True), compiler_options=FAST)(tree)
    want = stats.metrics()

    def state():
        return TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                 jax.random.PRNGKey(3))

    out = {}
    for name, kw in (("jit", {}), ("jit-mb2", dict(microbatches=2))):
        step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, compiler_options=FAST, **kw)
        s, m = step(state(), params, batch)
        out[name] = (s.opt_state, m)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="pmap", microbatches=2)
    s, m = step(replicate(state()), replicate(params), batch)
    out["pmap-mb2"] = (unreplicate(s.opt_state), m)
    mesh = make_mesh(data=2, fsdp=4)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="mesh", mesh=mesh,
                           microbatches=2, compiler_options=FAST)
    s, m = step(state(), shard_params(params, mesh), batch)
    out["mesh-mb2"] = (s.opt_state, m)
    want_layers = np.asarray(want["residual_norm_layers"])
    assert want_layers.shape == (2,) and np.all(want_layers > 0)
    for name, (recorded, m) in out.items():
        for a, b in zip(jax.tree_util.tree_leaves(recorded), jax.tree_util.tree_leaves(grads)):
            assert rel_err(a, b) < 5e-5, name  # float32 sums in another order
        assert abs(float(m.loss) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))), name
        np.testing.assert_allclose(np.asarray(m.residual_norm_layers), want_layers, rtol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(float(m.residual_norm_mean), want_layers.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="decoder layers"):
        make_train_step(CFG, GRPOConfig(arca_layers=[LAYERS]), opt, lora_scale=LCFG.scaling)
