"""`qwen3.model.masked_attention`: the einsum attention whose backward recomputes its
probabilities equals the plain masked softmax attention and autodiff's gradient of it (numpy and
jax references), with causal, packed-segment and shared-prefix masks and a query that sees
nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax.qwen3.model import masked_attention


def plain(q, k, v, visible):
    """The formula as written, left to autodiff."""
    H = q.shape[-1]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * H ** -0.5
    s = jnp.where(visible[:, None, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s, -1).astype(v.dtype), v)


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
    got = np.asarray(masked_attention(q, k, v, visible))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, np.asarray(visible)), atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(plain(q, k, v, visible)), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradient_equals_autodiff(dtype, tol):
    q, k, v, visible, dout = inputs(dtype, seed=1)
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
