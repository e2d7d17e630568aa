"""The GRPO objective on a Qwen3 mixture-of-experts model: the gradient of the ARCA-weighted loss
plus the router's load-balancing term with respect to an attention adapter against torch autograd
through PEFT and transformers' `aux_loss`; the train step's routing metrics on one device, over
microbatches and on a mesh; a dense model's are None."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arca_jax import parallel, qwen3
from arca_jax.batch import Batch
from arca_jax.grpo import GRPOConfig
from arca_jax.grpo.objective import loss_fn
from arca_jax.grpo.signals import all_method_weights
from arca_jax.grpo.step import TrainState, make_train_step
from fixtures import (completion_batch, grad_recorder, peft_adapter_tree, positions_of,
                      ragged_batch, random_checkpoint, random_params, random_peft_model, rel_err,
                      tiny_config, tiny_moe_hf_config)

ATTN = list(qwen3.ATTN_PROJS)
COEF = 0.3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A random tiny MoE model (layer 1 dense, 8 experts, top-3 raw probabilities), a random PEFT
    adapter on its attention projections (r 4, alpha 8) and a ragged batch: B = 5 rows of T = 14,
    left-padded prompts in [0, 6), completions from 6, right-padded."""
    cfg = tiny_moe_hf_config(experts=8, top_k=3, norm_topk=False, layers=3, mlp_only=(1,))
    model, config, params = random_checkpoint(cfg, seed=2, path=tmp_path_factory.mktemp("moe"))
    pm = random_peft_model(model, r=4, alpha=8.0, targets=ATTN, seed=5, scale=0.3)
    ids, am, cm, adv = completion_batch(cfg.vocab_size)
    batch = Batch(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(am, jnp.int32),
                  completion_mask=jnp.asarray(cm, jnp.int32), advantages=jnp.asarray(adv))
    return pm, config, params, peft_adapter_tree(pm, targets=ATTN), batch


def test_loss_gradient_matches_torch(case):
    """d/d(A, B) of the ARCA-weighted GRPO loss (on-policy, "sequence") plus COEF x the
    load-balancing loss: ours against torch autograd through PEFT, whose loss is
    -sum_b A_b sum_t w_bt log p(y_bt) / B + COEF x transformers' aux_loss, with w our (detached)
    ARCA weights. Routing choices are not differentiated in either; the probabilities are."""
    pm, config, params, tree, batch = case
    g = GRPOConfig(weighting="arca", sharpening=2.0, router_aux_loss_coef=COEF)
    (value, stats), grads = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(t, params, batch, config=config, lora_scale=2.0, grpo_config=g),
        has_aux=True))(tree)
    w = np.asarray(all_method_weights(tree, params, batch, config=config, lora_scale=2.0,
                                      grpo_config=g, methods=("arca",))["arca"])
    assert np.ptp(w[w > 0]) > 1e-3  # the adapter moves the hidden states: weights not uniform

    ids, am = np.asarray(batch.input_ids, np.int64), np.asarray(batch.attention_mask, np.int64)
    pm.zero_grad()
    out = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(am),
             position_ids=torch.as_tensor(positions_of(am)), output_router_logits=True)
    logp = torch.log_softmax(out.logits[:, :-1], -1).gather(
        -1, torch.as_tensor(ids)[:, 1:, None])[..., 0]
    adv = torch.as_tensor(np.array(batch.advantages))[:, None]
    pg = -(adv * logp * torch.as_tensor(w[:, 1:])).sum() / ids.shape[0]
    ref = pg + COEF * out.aux_loss
    ref.backward()
    assert abs(float(value) - float(ref.detach())) < 1e-4 * abs(float(ref.detach()))
    assert abs(float(stats.metrics()["aux_loss"]) - float(out.aux_loss.detach())) < 1e-5
    for layer, blk in enumerate(pm.base_model.model.model.layers):
        for proj in ATTN:
            mod = getattr(blk.self_attn, proj)
            for part, ours in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                want = getattr(mod, part)["default"].weight.grad.numpy().T
                got = np.asarray(grads["layers"]["self_attn"][proj][ours][layer])
                assert np.linalg.norm(want) > 0
                assert rel_err(got, want) < 1e-4, (layer, proj, part, rel_err(got, want))
    pm.zero_grad()


def _step(config, params, tree, batch, **kw):
    g = GRPOConfig(weighting="arca", router_aux_loss_coef=COEF)
    opt = grad_recorder()
    step = make_train_step(config, g, opt, lora_scale=2.0, donate=False, **kw)
    state, metrics = step(TrainState.create(tree, opt, jax.random.PRNGKey(0)), params, batch)
    return metrics, state.opt_state


@pytest.mark.slow
def test_train_step_routing_metrics_microbatches_and_mesh(case):
    """expert_load [Ls, E] is exact over microbatches (token-weighted), aux_loss is the
    microbatches' weighted mean; a ("data", "fsdp") mesh equals one device within 1e-5."""
    _, config, params, tree, _ = case
    batch = ragged_batch(config.vocab_size, B=8, T=10)
    one, g1 = _step(config, params, tree, batch)
    load = np.asarray(one.expert_load)
    assert load.shape == (2, 8) and np.isfinite(float(one.aux_loss))
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
    mb, _ = _step(config, params, tree, batch, microbatches=2)
    np.testing.assert_allclose(np.asarray(mb.expert_load), load, atol=1e-6)
    mesh, gm = _step(config, params, tree, batch, mode="mesh",
                     mesh=parallel.make_mesh(data=4, fsdp=2, tensor=1))
    for a, b in ((mesh.loss, one.loss), (mesh.aux_loss, one.aux_loss),
                 (mesh.expert_load, one.expert_load)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gm, g1)


def test_dense_model_has_no_routing_metrics():
    config = tiny_config()
    g = GRPOConfig(weighting="uniform", router_aux_loss_coef=COEF)  # ignored by a dense model
    batch = ragged_batch(config.vocab_size, B=4, T=8)
    _, stats = jax.jit(lambda p: loss_fn(None, p, batch, config=config, lora_scale=1.0,
                                         grpo_config=g))(random_params(config))
    assert stats.aux_sum is None and stats.expert_load_sum is None
    m = stats.metrics()
    assert m["aux_loss"] is None and m["expert_load"] is None
