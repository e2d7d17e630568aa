"""`qwen3.cpu_attention`: the C++ kernel's values and gradients equal `masked_attention`'s
(random segment masks, a query that sees nothing, key counts off the 16-key tiles, several head
sizes); "auto" picks it on CPU for float32 only; without the kernels (turned off, or no
compiler) "auto" runs the einsum attention, the decode path XLA's dots, and an explicit
"cpu-kernel" (attention or matmul) is a clear error."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import qwen3
from arca_jax.qwen3 import cpu_attention, cpu_kernels
from arca_jax.qwen3.einsum_attention import masked_attention

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"CPU kernels: {cpu_kernels.error()}")


def _inputs(B, K, G, T, S, H, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, K, G, T, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, K, S, H)).astype(np.float32) for _ in range(2))
    seg_q = rng.integers(0, 4, (B, T))
    seg_k = np.concatenate([seg_q, rng.integers(0, 4, (B, S - T))], 1)[:, :S]
    vis = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)
    vis &= np.arange(S)[None, None, :] <= np.arange(T)[None, :, None] + (S - T)
    vis[0, 1, :] = False  # a query that sees nothing: the mean of every value
    return (*map(jnp.asarray, (q, k, v)), jnp.asarray(vis),
            jnp.asarray(rng.normal(size=(B, K, G, T, H)).astype(np.float32)))


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 2, 2, 40, 40, 32), (2, 1, 4, 37, 37, 16),
                                   (2, 2, 1, 20, 52, 64), (1, 1, 1, 5, 5, 128),
                                   (1, 2, 3, 19, 19, 24), (1, 1, 2, 9, 9, 256),
                                   (1, 1, 4, 70, 70, 64)],
                         ids=["grouped", "odd-keys", "more-keys", "head128", "odd-head",
                              "head256", "four-heads-64"])
def test_values_and_gradients_equal_masked_attention(shape):
    q, k, v, vis, w = _inputs(*shape, seed=sum(shape))
    np.testing.assert_allclose(cpu_attention.attention(q, k, v, vis),
                               masked_attention(q, k, v, vis), rtol=1e-5, atol=2e-6)
    grads = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, vis) * w),  # noqa: E731
                                argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(jax.jit(lambda: grads(cpu_attention.attention))(),
                         grads(masked_attention)):
        scale = max(float(jnp.max(jnp.abs(want))), 1.0)  # a gradient may be all zeros
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale


@needs_kernel
def test_head_sizes_above_256_are_refused():
    q, k, v, vis, _ = _inputs(1, 1, 1, 4, 4, 272, seed=0)
    with pytest.raises(Exception, match="head size above 256"):
        jax.block_until_ready(cpu_attention.attention(q, k, v, vis))


@needs_kernel
def test_auto_picks_the_kernel_on_cpu_for_float32_only():
    assert qwen3.resolve_attention("auto", jnp.float32) == "cpu-kernel"
    assert qwen3.resolve_attention("auto", jnp.bfloat16) == "einsum"
    assert qwen3.resolve_attention("cpu-kernel", jnp.float32) == "cpu-kernel"
    # under a mesh (the "mesh" train step, `plan`'s programs) "auto" is not the kernel
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert qwen3.resolve_attention("auto", jnp.float32, mesh) == "einsum"


WITHOUT = r"""
import jax, jax.numpy as jnp
from arca_jax import qwen3
from arca_jax.qwen3 import cpu_kernels
print(cpu_kernels.available(), qwen3.resolve_attention("auto", jnp.float32),
      qwen3.default_matmul(jnp.float32))
try:
    qwen3.resolve_attention("cpu-kernel", jnp.float32)
except ValueError as e:
    print("refused:", e)
config = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16)
params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
try:
    qwen3.inference_weights(params, config, matmul="cpu-kernel")
except ValueError as e:
    print("refused:", e)
try:
    qwen3.cpu_matmul.pack(jnp.ones((4, 16)))
except ValueError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("env, why", [({cpu_kernels.ENV: "0"}, "ARCA_JAX_CPU_KERNELS=0"),
                                      ({"CXX": "/nonexistent/c++"}, "nonexistent")],
                         ids=["turned-off", "no-compiler"])
def test_without_the_kernels_auto_runs_xla(env, why, tmp_path):
    full = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", WITHOUT], capture_output=True, text=True,
                         env=full, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False einsum xla"
    assert lines[1].startswith("refused: attention 'cpu-kernel'") and why in lines[1]
    assert lines[2].startswith("refused: matmul 'cpu-kernel'") and why in lines[2]
    assert lines[3].startswith("refused: cpu_matmul.pack") and why in lines[3]


@pytest.mark.skipif(os.environ.get(cpu_kernels.ENV, "1").strip().lower() in ("0", "false", "no",
                                                                             "off")
                    or not shutil.which(os.environ.get("CXX") or "g++"),
                    reason="the kernels are turned off, or there is no C++ compiler")
def test_the_library_builds_where_a_compiler_is():
    # the kernels' tests skip when the library is unavailable: a source that fails to compile
    # must fail here rather than turn them all into skips
    assert cpu_kernels.available(), cpu_kernels.error()
