"""Packed training forwards (`arca_jax.packing`): the plan puts every real token in exactly one
slot; a packed forward equals the padded one at every real token; the loss, gradient and
statistics of every weighting (KL, ARCA over decoder layers) and a whole train step equal the
padded batch's; packed batches refuse the modes that would split them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arca_jax import credit, lora, packing, qwen3
from arca_jax.batch import Batch
from arca_jax.grpo import GRPOConfig, TrainState, loss_fn, make_train_step
from fixtures import grad_recorder, random_adapter, random_params, tiny_config, trees_close

CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
TOL = {"entropy_reduction": 1e-3}  # a difference of nearly equal entropies (see test_tensor_parallel)


def grpo_batch(B=16, P=6, N=10, seed=0, hole=False):
    """Left-padded prompts of 1..P tokens, completions of 1..N tokens then padding; with `hole`,
    one row also has a masked token inside its completion."""
    rng = np.random.default_rng(seed)
    T = P + N
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    am = np.zeros((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b in range(B):
        p, n = int(rng.integers(1, P + 1)), int(rng.integers(1, N + 1))
        am[b, P - p:P + n] = 1
        cm[b, P:P + n] = 1
    if hole:
        am[0, P + 1] = cm[0, P + 1] = 0
        am[0, P + 2:P + 4] = cm[0, P + 2:P + 4] = 1
    ids = np.where(am == 1, ids, 0)
    pos = np.maximum(np.cumsum(am, axis=1) - 1, 0).astype(np.int32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                 completion_mask=jnp.asarray(cm),
                 advantages=jnp.asarray(rng.normal(size=B).astype(np.float32)),
                 positions=jnp.asarray(pos))


@pytest.fixture(scope="module")
def model():
    return random_params(CFG, seed=0, scale=2.0), random_adapter(CFG, LCFG, seed=1, scale=0.2)


@pytest.mark.parametrize("seed,hole,wide", [(0, False, False), (1, True, False), (2, False, True)])
def test_plan_places_every_real_token_once(seed, hole, wide):
    b = grpo_batch(B=24, seed=seed, hole=hole)
    mask = np.asarray(b.attention_mask) != 0
    B, T = mask.shape
    W = 2 * T if wide else T  # lines of W slots
    pk = packing.plan(mask, multiple=4, width=W if wide else None)
    src, seg, dst = (np.asarray(x) for x in (pk.src, pk.segments, pk.dst))
    L = src.shape[0]
    assert L % 4 == 0 and L <= B and src.shape == seg.shape == (L, W)
    assert L < B  # these rows are about half padding: they share lines
    filled = seg > 0
    # every real token exactly once, in a slot of its own row's segment, in order
    assert filled.sum() == mask.sum()
    assert sorted(src[filled].tolist()) == sorted(np.flatnonzero(mask.reshape(-1)).tolist())
    assert np.array_equal(seg[filled] - 1, src[filled] // T)
    assert (dst[~mask] == -1).all()
    assert np.array_equal(src.reshape(-1)[dst[mask]], np.flatnonzero(mask.reshape(-1)))  # inverse
    for line in range(L):  # each row's tokens are one contiguous run, in order
        for r in set(seg[line][filled[line]].tolist()):
            slots = np.flatnonzero(seg[line] == r)
            assert np.array_equal(slots, np.arange(slots[0], slots[0] + slots.size))
            assert (np.diff(src[line, slots]) > 0).all()
    # at least as many lines as the tokens need; `lines` is a floor
    assert L >= -(-mask.sum() // W)
    assert packing.plan(mask, lines=L + 3, width=W).src.shape[0] == L + 3
    with pytest.raises(ValueError, match="narrower"):
        packing.plan(mask, width=T - 1)


def test_plan_skips_empty_rows():
    mask = np.zeros((4, 5), np.int32)
    mask[1, 1:4] = 1
    pk = packing.plan(mask)
    assert pk.lines == 1 and (np.asarray(pk.dst)[[0, 2, 3]] == -1).all()


def check_packed_forward(model, b: Batch, pk: packing.Packing, tol: float):
    """The packed forward's hidden states and layer outputs, back in [B, T], equal the padded
    forward's at every real token within ``tol`` and are 0 at padding."""
    params, tree = model
    ref = qwen3.forward(params, b.input_ids, config=CFG, attention_mask=b.attention_mask,
                        positions=b.positions, lora=tree, lora_scale=LCFG.scaling,
                        return_logits=False, return_layers=True, attention="einsum")
    out = qwen3.forward(params, packing.to_lines(pk, b.input_ids), config=CFG,
                        segment_ids=pk.segments, prefix_ids=pk.prefix,
                        positions=packing.to_lines(pk, b.positions), lora=tree,
                        lora_scale=LCFG.scaling, return_logits=False, return_layers=True)
    m = np.asarray(b.attention_mask, bool)
    got = np.asarray(packing.from_lines(pk, out.hidden))
    np.testing.assert_allclose(got[m], np.asarray(ref.hidden)[m], rtol=tol, atol=tol)
    assert (got[~m] == 0).all()
    layers = np.asarray(packing.from_lines(pk, out.layers, axis=1))
    np.testing.assert_allclose(layers[:, m], np.asarray(ref.layers)[:, m], rtol=tol, atol=tol)


@pytest.mark.parametrize("hole,width", [(False, None), (True, None), (False, 40)])
def test_packed_forward_equals_padded_at_real_tokens(model, hole, width):
    params, tree = model
    b = grpo_batch(hole=hole)
    check_packed_forward(model, b, packing.plan(b.attention_mask, width=width), 1e-5)
    pk = packing.plan(b.attention_mask)
    with pytest.raises(ValueError, match="einsum"):
        qwen3.forward(params, b.input_ids, config=CFG, segment_ids=pk.segments[:1],
                      attention="sdpa-xla")


def _all(tree, params, batch):
    out = {}
    for name in credit.registered():
        g = GRPOConfig(weighting=name, kl_beta=0.02)
        out[name] = jax.value_and_grad(
            lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling,
                              grpo_config=g), has_aux=True)(tree)
    g = GRPOConfig(weighting="arca", arca_layers="all", arca_relative=True)
    out["arca_layers"] = jax.value_and_grad(
        lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g),
        has_aux=True)(tree)
    return out


def test_every_weighting_equals_padded(model):
    params, tree = model
    b = grpo_batch(seed=3)
    ref = jax.jit(_all)(tree, params, b)
    got = jax.jit(_all)(tree, params, packing.pack(b, multiple=4))
    assert set(got) == set(credit.registered()) | {"arca_layers"}
    for name in got:
        trees_close(got[name], ref[name], TOL.get(name, 1e-5))
    assert float(ref["arca"][0][1].residual_norm_max) > 0


def test_train_step_equals_padded_and_refuses_split_modes(model):
    params, tree = model
    b = grpo_batch(seed=4)
    opt = grad_recorder()
    g = GRPOConfig(weighting="arca", sharpening=2.0)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, donate=False)
    key = jax.random.PRNGKey(0)
    s_ref, m_ref = step(TrainState.create(tree, opt, key), params, b)
    s_got, m_got = step(TrainState.create(tree, opt, key), params, packing.pack(b))
    # float32 rounding only, amplified by this random model (weights of scale 2, sharpening 2):
    # the attention's query blocks (4 on CPU) cut the padded rows and the packed lines at
    # different slots, so their sums run in different orders (one block: 0.9e-5 under the
    # tests' XLA flags, four: 1.3e-5); a missing mask or a misplaced token is O(1)
    trees_close(s_got.opt_state, s_ref.opt_state, tol=3e-5)  # the gradient
    trees_close(m_got, m_ref, tol=3e-5)
    from arca_jax import parallel
    for mode, mb in (("pmap", 1), ("jit", 2), ("mesh", 1)):
        mesh = parallel.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
        bad = make_train_step(CFG, g, optax.sgd(0.1), lora_scale=LCFG.scaling, mode=mode,
                              microbatches=mb, donate=False, mesh=mesh if mode == "mesh" else None)
        state = TrainState.create(tree, optax.sgd(0.1), key)
        with pytest.raises(ValueError, match="packed batch"):
            bad(state, params, packing.pack(b))


# --- shared prompts (`packing.plan_shared`, `train.share_prompts`) -----------------------------

def group_batch(groups=5, G=4, P=6, N=10, seed=0, singles=1) -> Batch:
    """GRPO groups: G consecutive rows with one left-padded prompt of 1..P tokens and their own
    completions of 0..N tokens, then `singles` rows with prompts of their own (groups of one);
    one group's rows all have empty completions."""
    rng = np.random.default_rng(seed)
    T = P + N
    rows = []
    for g in range(groups + singles):
        p = int(rng.integers(1, P + 1))
        prompt = rng.integers(1, CFG.vocab_size, p)
        for _ in range(G if g < groups else 1):
            n = 0 if g == 1 else int(rng.integers(0, N + 1))
            ids, am = np.zeros(T, np.int32), np.zeros(T, np.int32)
            ids[P - p:P], am[P - p:P + n] = prompt, 1
            ids[P:P + n] = rng.integers(1, CFG.vocab_size, n)
            rows.append((ids, am))
    ids, am = (np.stack(x) for x in zip(*rows))
    cm = am * (np.arange(T) >= P)
    pos = np.maximum(np.cumsum(am, axis=1) - 1, 0).astype(np.int32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                 completion_mask=jnp.asarray(cm),
                 advantages=jnp.asarray(rng.normal(size=len(rows)).astype(np.float32)),
                 positions=jnp.asarray(pos), prompt_width=P)


def test_prompt_groups_compare_tokens_padding_and_positions():
    b = group_batch(groups=3, G=3, singles=2)
    groups = packing.prompt_groups(b.input_ids, b.attention_mask, b.positions, b.prompt_width)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4]
    ids, am = np.asarray(b.input_ids).copy(), np.asarray(b.attention_mask)
    ids[1, b.prompt_width - 1] += 1  # one token differs: row 1 starts a group, row 2 another
    assert packing.prompt_groups(ids, am, b.positions, b.prompt_width)[:4].tolist() == [0, 1, 2, 3]
    pos = np.asarray(b.positions) + (np.arange(len(ids)) == 2)[:, None]  # positions differ
    assert packing.prompt_groups(b.input_ids, am, pos, b.prompt_width)[:4].tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("seed,width", [(0, None), (1, 32), (2, None)])
def test_plan_shared_places_completions_once_after_their_prompt(seed, width):
    b = group_batch(seed=seed)
    mask = np.asarray(b.attention_mask) != 0
    ids = np.asarray(b.input_ids)
    B, T = mask.shape
    P = b.prompt_width
    groups = packing.prompt_groups(b.input_ids, b.attention_mask, b.positions, P)
    pk = packing.plan_shared(b.input_ids, mask, b.positions, P, multiple=2, width=width)
    src, seg, pre, dst = (np.asarray(x) for x in (pk.src, pk.segments, pk.prefix, pk.dst))
    W = src.shape[1]
    assert pk.lines % 2 == 0 and W == (width or T)
    comp = mask & (np.arange(T) >= P)
    rows = seg <= B
    # every completion token once, in its row's segment, after the prompt copy it attends to
    assert sorted(src[(seg > 0) & rows].tolist()) == sorted(np.flatnonzero(comp.reshape(-1)))
    assert np.array_equal(seg[(seg > 0) & rows] - 1, src[(seg > 0) & rows] // T)
    assert (pre[(seg > 0) & rows] > B).all() and (pre[~rows | (seg == 0)] == 0).all()
    flat = lambda x: x.reshape(-1)
    for b in range(B):
        slots = dst[b][mask[b]]
        assert np.array_equal(flat(ids)[flat(src)[slots]], ids[b][mask[b]])  # the same tokens
        lines = set((slots // W).tolist())
        assert len(lines) == 1  # a row's prompt copy and completion share its line
        copy = flat(seg)[dst[b][mask[b] & ~comp[b]]]
        assert len(set(copy.tolist())) <= 1 and (copy > B).all()
        if comp[b].any():
            assert (flat(pre)[dst[b][comp[b]]] == copy[0]).all()
            assert dst[b][comp[b]].min() > dst[b][mask[b] & ~comp[b]].max()  # prompt first
    assert (dst[~mask] == -1).all()
    with pytest.raises(ValueError, match="prompt_width"):
        packing.plan_shared(ids, mask, np.zeros_like(ids), T + 1)
    # fewer slots than one prompt per row: each group's copies number its blocks
    copies = set(seg[seg > B].tolist())
    assert (seg > 0).sum() == comp.sum() + (seg > B).sum()
    assert len(copies) < len(set(groups.tolist())) + B // 2  # about one copy per two rows
    assert (seg > B).sum() < (mask & ~comp).sum()  # fewer prompt slots than unshared


@pytest.mark.parametrize("seed", [0, 3])
def test_shared_forward_equals_padded_at_real_tokens(model, seed):
    params, _ = model
    b = group_batch(seed=seed)
    pk = packing.pack(b, share_prompts=True).packing
    assert pk.prefix is not None and pk.lines < packing.plan(b.attention_mask).lines
    # float32 rounding (weights of scale 2; this batch packed without sharing is off by 5e-5 too)
    check_packed_forward(model, b, pk, 1e-4)
    with pytest.raises(ValueError, match="segment_ids"):
        qwen3.forward(params, b.input_ids, config=CFG, prefix_ids=pk.prefix)


def _arca(tree, params, batch):
    out = {}
    for name, g in (("arca_kl", GRPOConfig(weighting="arca", kl_beta=0.02)),
                    ("arca_layers", GRPOConfig(weighting="arca", arca_layers="all",
                                               arca_relative=True))):
        out[name] = jax.value_and_grad(
            lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling,
                              grpo_config=g), has_aux=True)(tree)
    return out


def test_shared_loss_and_gradient_equal_padded(model):
    """The gradient reaches each shared prompt copy from every row it serves."""
    params, tree = model
    b = group_batch(seed=5)
    ref = jax.jit(_arca)(tree, params, b)
    got = jax.jit(_arca)(tree, params, packing.pack(b, multiple=2, share_prompts=True))
    for name in ref:
        trees_close(got[name], ref[name], 1e-5)
    assert float(ref["arca_kl"][0][1].residual_norm_max) > 0
    # without the prompt width the batch packs as before (no sharing)
    assert packing.pack(b.replace(prompt_width=None), share_prompts=True).packing.prefix is None
