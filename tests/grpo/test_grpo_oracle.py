"""The GRPO loss and its LoRA gradients against an independent PyTorch + PEFT computation.

The oracle follows the paper's reference structure: a transformers Qwen3 with a PEFT LoRA
adapter, full [B, T, V] logits, log_softmax + gather at the shifted targets, a separate no-grad
forward with the adapter disabled for h_base / reference log-probs, token weights from plain
Python loops over rows, and torch autograd for the gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arca_jax.grpo import Batch, GRPOConfig, loss_fn
from fixtures import LORA_TARGETS, lora_block, peft_case, positions_of, rel_err

R, ALPHA = 4, 8.0
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU test speed; numerics unchanged


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    case = peft_case(layers=2, seed=11, path=tmp_path_factory.mktemp("grpo_base"), r=R,
                     alpha=ALPHA)
    return (case.pm, case.config, case.params, case.tree,
            (case.ids, case.attention_mask, case.completion_mask, case.advantages))


# ------------------------------ the oracle (torch, loops) -------------------------------------


def _row_weights(mode, alpha, H, valid_idx, eps, s):
    """Weights of one row over its valid positions (list), straight from the paper's formulas."""
    n = len(valid_idx)
    if n == 0:
        return {}
    if mode == "uniform":
        return {i: 1.0 / n for i in valid_idx}
    if mode == "entropy_reduction":
        a = {}
        for k, i in enumerate(valid_idx):
            a[i] = max(0.0, H[i] - H[valid_idx[k + 1]]) if k + 1 < n else 0.0
    else:
        a = {i: max(0.0, alpha[i]) for i in valid_idx}
    num = {i: (a[i] + eps) ** s for i in valid_idx}
    tot = sum(num.values())
    if not tot > eps:
        return {i: 1.0 / n for i in valid_idx}
    return {i: num[i] / tot for i in valid_idx}


def torch_objective(pm, data, *, mode, sharpening, eps=1e-8, kl_beta=0.0, old_logps=None,
                    clip=(0.2, 0.2), aggregation="sequence", max_len=None, noise_floor=1e-5):
    ids, am, cm, adv = data
    pm.zero_grad()
    ids_t, am_t = torch.as_tensor(ids), torch.as_tensor(am)
    pos_t = torch.as_tensor(positions_of(am))
    out = pm(input_ids=ids_t, attention_mask=am_t, position_ids=pos_t, output_hidden_states=True)
    logp_all = torch.log_softmax(out.logits[:, :-1].float(), -1)  # [B, T-1, V]
    logps = logp_all.gather(-1, ids_t[:, 1:, None])[..., 0]  # token t+1 scored at t
    ent = -(logp_all.exp() * logp_all).sum(-1).detach()
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids_t, attention_mask=am_t, position_ids=pos_t,
                  output_hidden_states=True)
        ref = torch.log_softmax(base.logits[:, :-1].float(), -1).gather(
            -1, ids_t[:, 1:, None])[..., 0]
        hb = base.hidden_states[-1][:, :-1]
        resid = (out.hidden_states[-1][:, :-1].detach() - hb).norm(dim=-1)
        resid = torch.where(resid > noise_floor * hb.norm(dim=-1), resid, 0.0)
    mask = (cm[:, 1:] * am[:, 1:]) == 1
    B, Tm1 = mask.shape
    lp_np, ref_np, ent_np, res_np = (x.detach().numpy().astype(np.float64)
                                     for x in (logps, ref, ent, resid))
    W = np.zeros((B, Tm1))
    for b in range(B):
        idx = [t for t in range(Tm1) if mask[b, t]]
        div = np.abs(lp_np[b] - ref_np[b])
        div = np.where(div <= noise_floor * np.maximum(1.0, np.abs(ref_np[b])), 0.0, div)
        alpha = {"surprisal": -lp_np[b], "divergence": div, "arca": res_np[b]}.get(
            mode, np.zeros(Tm1))
        for i, w in _row_weights(mode, alpha, ent_np[b], idx, eps, sharpening).items():
            W[b, i] = w
    W = torch.as_tensor(W, dtype=torch.float32)
    A = torch.as_tensor(adv)[:, None]
    if old_logps is None:
        pg = -A * logps
    else:
        ratio = torch.exp(logps - torch.as_tensor(old_logps[:, 1:]))
        pg = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - clip[0], 1 + clip[1]) * A)
    d = ref - logps
    kl = torch.exp(d) - d - 1
    m = torch.as_tensor(mask, dtype=torch.float32)
    n = m.sum(1, keepdim=True)
    if aggregation == "sequence":
        per_row = (W * pg * m).sum(1) + kl_beta * (kl * m).sum(1) / n.clamp(min=1)[:, 0]
        loss = per_row.sum() / (n[:, 0] > 0).sum()
    else:
        total = (W * n * pg * m).sum() + kl_beta * (kl * m).sum()
        z = m.sum() if aggregation == "token_mean" else B * max_len
        loss = total / z
    loss.backward()
    grads = {}
    for layer, blk in enumerate(pm.base_model.model.model.layers):
        for proj in LORA_TARGETS:
            mod = getattr(getattr(blk, lora_block(proj)), proj)
            grads[(layer, proj, "lora_a")] = mod.lora_A["default"].weight.grad.numpy().T
            grads[(layer, proj, "lora_b")] = mod.lora_B["default"].weight.grad.numpy().T
    return float(loss.detach()), grads


# ------------------------------------ tests ---------------------------------------------------


def _jax(setup, grpo_config, old_logps=None):
    pm, config, params, tree, (ids, am, cm, adv) = setup
    batch = Batch(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(am),
                  completion_mask=jnp.asarray(cm), advantages=jnp.asarray(adv),
                  old_logps=None if old_logps is None else jnp.asarray(old_logps))
    f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                static_argnames=("config", "lora_scale", "grpo_config"),
                compiler_options=FAST_COMPILE)
    (loss, stats), grads = f(tree, params, batch, config=config, lora_scale=ALPHA / R,
                             grpo_config=grpo_config)
    return float(loss), grads, stats


def _compare(jloss, jgrads, tloss, tgrads):
    assert abs(jloss - tloss) <= 1e-4 * max(abs(tloss), 1e-6), (jloss, tloss)
    for (layer, proj, part), g in tgrads.items():
        ours = np.asarray(jgrads["layers"][lora_block(proj)][proj][part][layer])
        assert np.linalg.norm(g) > 0
        assert rel_err(ours, g) < 1e-4, (layer, proj, part, rel_err(ours, g))


@pytest.mark.parametrize("sharpening", [1.0, 2.0])
@pytest.mark.parametrize("mode", ["uniform", "surprisal", "entropy_reduction", "divergence",
                                  "arca"])
def test_loss_and_lora_grads_match_peft(setup, mode, sharpening):
    jloss, jgrads, stats = _jax(setup, GRPOConfig(weighting=mode, sharpening=sharpening))
    tloss, tgrads = torch_objective(setup[0], setup[4], mode=mode, sharpening=sharpening)
    _compare(jloss, jgrads, tloss, tgrads)
    if mode == "arca":
        assert float(stats.residual_norm_max) > 0


def test_clip_kl_token_mean_match_peft(setup):
    """PPO clipping (asymmetric), the k3 KL term and the token-mean aggregation together."""
    ids, am, cm, adv = setup[4]
    rng = np.random.default_rng(3)
    # old log-probs = current ones + noise, so that some ratios leave [0.8, 1.28]
    pm = setup[0]
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(am),
                 position_ids=torch.as_tensor(positions_of(am)))
        lp = torch.log_softmax(out.logits[:, :-1], -1).gather(
            -1, torch.as_tensor(ids)[:, 1:, None])[..., 0].numpy()
    old = np.zeros(ids.shape, np.float32)
    old[:, 1:] = lp + rng.normal(scale=0.4, size=lp.shape)
    g = GRPOConfig(weighting="arca", sharpening=2.0, kl_beta=0.1, clip_eps=0.2,
                   clip_eps_high=0.28, loss_aggregation="token_mean")
    jloss, jgrads, stats = _jax(setup, g, old_logps=old)
    tloss, tgrads = torch_objective(pm, setup[4], mode="arca", sharpening=2.0, kl_beta=0.1,
                                    old_logps=old, clip=(0.2, 0.28), aggregation="token_mean")
    _compare(jloss, jgrads, tloss, tgrads)
    assert 0.05 < float(stats.clip_count) / float(stats.tokens) < 0.95
    assert float(stats.kl_sum) > 0


def test_dr_grpo_aggregation_matches_peft(setup):
    g = GRPOConfig(weighting="divergence", kl_beta=0.05, loss_aggregation="dr_grpo",
                   max_completion_length=16)
    jloss, jgrads, _ = _jax(setup, g)
    tloss, tgrads = torch_objective(setup[0], setup[4], mode="divergence", sharpening=1.0,
                                    kl_beta=0.05, aggregation="dr_grpo", max_len=16)
    _compare(jloss, jgrads, tloss, tgrads)
