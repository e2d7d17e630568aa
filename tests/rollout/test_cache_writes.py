"""`qwen3.inference._write_rows`, the cache's one write: each row's new slots land at its own
index along the slot axis (both key layouts); new values that fill the slot axis (a prompt's own
cache at prefill) are the result, with no write into the old buffer in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax.qwen3.inference import _write_rows


@pytest.mark.parametrize("axis", [2, 3], ids=["slots-then-head-dim", "keys-transposed"])
def test_rows_land_at_their_own_index(axis):
    rng = np.random.default_rng(axis)
    shape = [3, 2, 4, 4]
    shape[axis] = 7
    buf = rng.normal(size=shape).astype(np.float32)
    new_shape = list(shape)
    new_shape[axis] = 2
    new = rng.normal(size=new_shape).astype(np.float32)
    index = np.array([0, 3, 5], np.int32)
    got = np.asarray(_write_rows(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(index), axis=axis))
    want = buf.copy()
    for b, i in enumerate(index):
        at = [slice(None)] * 3
        at[axis - 1] = slice(i, i + 2)
        want[b][tuple(at)] = new[b]
    np.testing.assert_array_equal(got, want)


def test_a_write_that_fills_the_slot_axis_is_the_new_values():
    rng = np.random.default_rng(0)
    buf = jnp.zeros((3, 2, 5, 4), jnp.float32)
    new = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)
    index = jnp.zeros((3,), jnp.int32)
    np.testing.assert_array_equal(np.asarray(_write_rows(buf, new, index, axis=2)), np.asarray(new))
    jaxpr = str(jax.make_jaxpr(lambda b, n, i: _write_rows(b, n, i, axis=2))(buf, new, index))
    assert "dynamic_update_slice" not in jaxpr and "scatter" not in jaxpr
    partial = str(jax.make_jaxpr(lambda b, n, i: _write_rows(b, n, i, axis=2))(
        buf, new[:, :, :3], index))
    assert "scatter" in partial or "dynamic_update_slice" in partial  # the check above can fail
