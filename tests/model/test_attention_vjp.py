"""`qwen3.einsum_attention.masked_attention`: the einsum attention whose backward recomputes its
probabilities equals the plain masked softmax attention and autodiff's gradient of it (numpy and
jax references), with causal, packed-segment and shared-prefix masks and a query that sees
nothing; `qwen3.einsum_attention.causal_blocks` (query blocks, each against the keys up to its end) equals
one block, values and gradients, and computes no score above its diagonal blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import qwen3
from arca_jax.qwen3.einsum_attention import causal_blocks, masked_attention


def plain(q, k, v, visible):
    """The formula as written, left to autodiff (head-major, as `masked_attention`)."""
    H = q.shape[-1]
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * H ** -0.5
    s = jnp.where(visible[:, None, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BKGTS,BKSH->BKGTH", jax.nn.softmax(s, -1).astype(v.dtype), v)


def heads(q, k, v):
    """The model's layout (q [B, T, K, G, H], k and v [B, S, K, H]) -> head-major."""
    return jnp.transpose(q, (0, 2, 3, 1, 4)), *(jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))


def model_layout(out):
    """[B, K, G, T, H] -> [B, T, K, G, H]."""
    return jnp.transpose(out, (0, 3, 1, 2, 4))


def inputs(dtype, seed=0, B=2, T=9, K=2, G=3, H=8):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (jnp.asarray(rng.normal(size=s) * 2, dtype) for s in
                     ((B, T, K, G, H), (B, T, K, H), (B, T, K, H), (B, T, K, G, H)))
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0], [5, 5, 6, 6, 6, 6, 7, 7, 7]])
    pre = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 5, 5, 5, 5, 5, 5, 5]])  # shared prompts
    causal = np.tril(np.ones((T, T), bool))
    visible = causal & ((seg[:, :, None] == seg[:, None, :]) | (pre[:, :, None] == seg[:, None, :]))
    visible &= (seg > 0)[:, None, :]  # row 0's last slot is empty: its query sees nothing
    assert not visible[0, -1].any()
    return q, k, v, jnp.asarray(visible), dout


def numpy_attention(q, k, v, visible):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(visible[:, None, None], s, -np.inf)
    m = np.max(np.where(np.isinf(s), -1e300, s), -1, keepdims=True)
    e = np.where(np.isinf(s), 0.0, np.exp(s - m))
    p = np.where(e.sum(-1, keepdims=True) > 0, e / np.maximum(e.sum(-1, keepdims=True), 1e-300),
                 1.0 / s.shape[-1])  # a query that sees nothing: uniform, as softmax of equal scores
    return np.einsum("bkgts,bskh->btkgh", p, v)


def test_forward_equals_numpy_and_the_plain_formula():
    q, k, v, visible, _ = inputs(jnp.float32)
    got = np.asarray(model_layout(masked_attention(*heads(q, k, v), visible)))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, np.asarray(visible)), atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(model_layout(plain(*heads(q, k, v), visible))),
                               atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradient_equals_autodiff(dtype, tol):
    q, k, v, visible, dout = inputs(dtype, seed=1)
    (q, k, v), dout = heads(q, k, v), jnp.transpose(dout, (0, 2, 3, 1, 4))
    _, vjp = jax.vjp(lambda q, k, v: masked_attention(q, k, v, visible), q, k, v)
    _, ref_vjp = jax.vjp(lambda q, k, v: plain(q, k, v, visible), q, k, v)
    for got, ref, name in zip(vjp(dout), ref_vjp(dout), "qkv"):
        assert got.dtype == ref.dtype == dtype, name
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.abs(ref).max() > 0.1, name
        np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), err_msg=name)


def test_under_jit_scan_and_checkpoint():
    """As the layer scan uses it: inside a jitted, rematerialised scan over layers."""
    q, k, v, visible, dout = inputs(jnp.float32, seed=2)
    (q, k, v), dout = heads(q, k, v), jnp.transpose(dout, (0, 2, 3, 1, 4))

    def stack(attn):
        def body(x, w):
            return jax.checkpoint(lambda x: attn(x * w, k, v, visible))(x), None
        return lambda x: (jax.lax.scan(body, x, jnp.array([1.0, 0.5, 2.0]))[0] * dout).sum()

    got = jax.jit(jax.grad(stack(masked_attention)))(q)
    ref = jax.jit(jax.grad(stack(plain)))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("remat,custom", [(False, True), (True, False), ("projections", False)])
def test_forward_recomputes_probabilities_without_remat_only(remat, custom):
    """Under remat the layer's replay computes the probabilities anyway: the plain formula."""
    from arca_jax import qwen3
    from fixtures import random_params, tiny_config

    cfg = tiny_config(vocab_size=32)
    params = random_params(cfg, seed=0)
    ids = jnp.ones((2, 6), jnp.int32)
    loss = lambda p: qwen3.forward(p, ids, config=cfg, remat=remat, attention="einsum",
                                   return_logits=False).hidden.sum()
    jaxpr = str(jax.make_jaxpr(loss)(params))  # the forward, before autodiff expands the call
    assert ("custom_vjp_call" in jaxpr) == custom


def _seen(visible):  # [B, T] queries that see at least one key
    return np.asarray(visible).any(-1)


@pytest.mark.parametrize("attend", [masked_attention, plain], ids=["recompute", "plain"])
@pytest.mark.parametrize("blocks", [2, 3, 4, 9, 20])
def test_causal_blocks_equal_one_block(attend, blocks):
    """Values and gradients (q, k, v) of every query that sees a key equal one call's (numpy
    reference for the values), with segment and shared-prefix masks; blocks beyond T: T blocks
    of one query. A query that sees nothing (row 0's last slot) is excluded: it averages its
    block's keys."""
    q, k, v, visible, dout = inputs(jnp.float32, seed=3)
    seen = _seen(visible)
    f = lambda q, k, v: causal_blocks(attend, q, k, v, visible, blocks)  # noqa: E731
    got, vjp = jax.vjp(f, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: model_layout(attend(*heads(q, k, v), visible)), q, k, v)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(ref)[seen], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[seen],
                               numpy_attention(q, k, v, np.asarray(visible))[seen], atol=1e-5)
    dout = jnp.where(jnp.asarray(seen)[:, :, None, None, None], dout, 0.0)
    for g, r, name in zip(vjp(dout), ref_vjp(dout), "qkv"):
        g, r = np.asarray(g), np.asarray(r)
        assert np.abs(r).max() > 0.1, name
        np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_causal_blocks_compute_no_scores_above_the_diagonal_blocks():
    """4 blocks of T = 8: score matmuls (those contracting head_dim H = 3) of 2 queries x 2, 4,
    6 and 8 keys, 40 of one block's 64 per head, in the forward and the backward."""
    rng = np.random.default_rng(0)
    B, T, K, G, H = 1, 8, 1, 2, 3
    q = jnp.asarray(rng.normal(size=(B, T, K, G, H)), jnp.float32)
    k = v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    visible = jnp.asarray(np.tril(np.ones((T, T), bool))[None])

    def score_sizes(blocks):  # elements of each score-shaped matmul of the gradient program
        loss = lambda q: causal_blocks(masked_attention, q, k, v, visible, blocks).sum()  # noqa: E731
        sizes = []

        def walk(jx):
            for e in jx.eqns:
                if e.primitive.name == "dot_general":
                    (lc, rc), _ = e.params["dimension_numbers"]
                    lhs = e.invars[0].aval.shape
                    if [lhs[d] for d in lc] == [H]:
                        sizes.append(int(np.prod(e.outvars[0].aval.shape)))
                for p in e.params.values():
                    inner = getattr(p, "jaxpr", p)
                    if hasattr(inner, "eqns"):
                        walk(inner)
        walk(jax.make_jaxpr(jax.grad(loss))(q).jaxpr)
        return sizes

    one, four = score_sizes(1), score_sizes(4)
    assert set(one) == {G * T * T} and len(one) >= 2  # the forward's and the backward's
    assert set(four) == {G * 2 * s for s in (2, 4, 6, 8)}
    assert sum(four) == sum(one) * 40 // 64


def test_attention_blocks_resolve_and_validate():
    from arca_jax.grpo import GRPOConfig

    assert qwen3.resolve_attention_blocks(None, "cpu") == qwen3.CPU_ATTENTION_BLOCKS > 1
    assert qwen3.resolve_attention_blocks(None, "tpu") == 1
    assert qwen3.resolve_attention_blocks(None, "gpu") == 1
    assert qwen3.resolve_attention_blocks(3, "tpu") == 3
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="attention_blocks"):
            qwen3.resolve_attention_blocks(bad)
        with pytest.raises(ValueError, match="attention_blocks"):
            GRPOConfig(attention_blocks=bad)


def test_forward_blocks_equal_one_block_on_packed_shared_lines():
    """`forward(attention_blocks=...)` on packed lines with shared prompts: the hidden states of
    every real slot equal one block's, LoRA on."""
    from fixtures import random_adapter, random_params, tiny_config
    from arca_jax import lora

    cfg = tiny_config(vocab_size=32)
    params = random_params(cfg, seed=0)
    tree = random_adapter(cfg, lora.LoraConfig(rank=4, alpha=8.0), seed=1, scale=0.2)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [5, 5, 6, 6, 6, 6, 7, 7, 7, 7]])
    pre = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 5, 5, 5, 5, 5, 5, 5, 5]])
    pos = jnp.asarray([[0, 1, 2, 3, 4, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]])
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 32, (2, 10)), jnp.int32)
    run = lambda n: np.asarray(qwen3.forward(  # noqa: E731
        params, ids, config=cfg, segment_ids=seg, prefix_ids=pre, positions=pos, lora=tree,
        lora_scale=2.0, return_logits=False, attention_blocks=n).hidden)
    one, real = run(1), np.asarray(seg) > 0
    for n in (2, 3, 10):
        np.testing.assert_allclose(run(n)[real], one[real], atol=1e-5 * np.abs(one).max())
