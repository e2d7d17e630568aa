"""Sampler replicas (`sampling.generate(devices=...)`, `arca_jax.replicas`): each device samples
its own contiguous share of the rows in its own loop. Each row's completion equals that of one
batch on one device for the same key, whatever the device count (padding included), the groups,
refill, halvings or greedy decoding; the output lands on the first device. And the count's
resolution, and the CPU devices the trainer's commands give JAX."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from arca_jax import lora, replicas, sampling
from arca_jax.config import RolloutConfig
from fixtures import assert_same_rows, grouped_rollout, tiny_config

CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
G = 4
N = 16
SAMPLED = dict(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def setup():
    """(params, 16 rows of 4 prompts x G, generate's keywords): EOS the token sampled most
    often, so rows end at different steps; LoRA on."""
    return grouped_rollout(CFG, LCFG, [3, 5, 7, 2], G, N, prompt_seed=1, **SAMPLED)


@pytest.mark.parametrize("n, extra", [
    (2, dict(SAMPLED)),
    (2, dict(SAMPLED, group_size=G)),                 # each device prefills its own groups
    (3, dict(SAMPLED, group_size=G)),                 # 4 groups over 3 devices: padded to 6
    (2, dict(SAMPLED, group_size=G, max_batch=8, admit_rows=G, shrink=1)),  # refill, halving
    (4, dict(greedy=True, shrink=2)),
], ids=["rows", "groups", "padded", "refill-shrink", "greedy"])
def test_replicas_give_the_one_device_rows(setup, n, extra):
    params, ids, mask, gen = setup
    rng = jax.random.PRNGKey(3)
    one = sampling.generate(params, ids, mask, rng=rng, **gen, **extra)
    split = sampling.generate(params, ids, mask, rng=rng, devices=jax.devices()[:n], **gen,
                              **extra)
    assert_same_rows(split, one)
    assert split.tokens.shape == (ids.shape[0], N)
    assert split.tokens.sharding.device_set == {jax.devices()[0]}
    lengths = np.asarray(one.lengths)
    assert lengths.sum() <= int(split.slot_steps)
    if "temperature" in extra:  # a real test: rows end at different steps, some at the limit
        assert len(set(lengths.tolist())) > 3 and lengths.min() < N
        assert np.asarray(one.finished).any() and not np.asarray(one.finished).all()
    if n == 2 and "max_batch" not in extra and "shrink" not in extra:
        # each device runs to its own longest row, not the batch's
        half = ids.shape[0] // 2
        own = lengths[:half].max() * half + lengths[half:].max() * half
        assert int(split.slot_steps) == own <= ids.shape[0] * int(one.num_steps)


def test_replicas_with_a_mesh_refused(setup):
    from arca_jax import parallel

    params, ids, mask, gen = setup
    with pytest.raises(ValueError, match="a mesh or several devices"):
        sampling.generate(params, ids, mask, rng=jax.random.PRNGKey(0), devices=jax.devices()[:2],
                          mesh=parallel.make_mesh(data=2), **gen)


def test_replica_count_resolves_per_platform_and_validates():
    """None: DEVICES_PER_CORE per core on CPU, up to the CPU devices JAX has (8 here, conftest);
    1 elsewhere. An int: as given, at most the devices there are."""
    devices = jax.local_device_count()
    per_host = replicas.cores() * replicas.DEVICES_PER_CORE
    assert replicas.resolve(None, "cpu") == max(1, min(per_host, devices))
    assert replicas.resolve(None, "gpu") == replicas.resolve(None, "tpu") == 1
    assert replicas.resolve(2) == 2 and replicas.resolve(1) == 1
    assert replicas.devices(1) is None
    assert replicas.devices(3) == jax.local_devices()[:3]
    # left to it, no fewer than MIN_SLOTS slots per device; a count given is kept
    if replicas.resolve(None) > 1:
        assert replicas.devices(None, replicas.MIN_SLOTS * 2 - 1) is None
        assert len(replicas.devices(None, replicas.MIN_SLOTS * 2)) == 2
        assert len(replicas.devices(None, 10 ** 6)) == replicas.resolve(None)
    assert replicas.devices(2, 4) == jax.local_devices()[:2]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="replicas must be"):
            replicas.resolve(bad)
    with pytest.raises(ValueError, match=f"this process has {devices}"):
        replicas.resolve(devices + 1)
    assert RolloutConfig().replicas is None
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        RolloutConfig(replicas=0)


CORES = r"""
from arca_jax import replicas
n = replicas.use_cpu_cores()
import jax
print(n, jax.device_count(), replicas.cores() * replicas.DEVICES_PER_CORE)
"""


@pytest.mark.parametrize("flags, want", [
    ("", None), ("--xla_force_host_platform_device_count=3", 3)], ids=["unset", "set-by-the-user"])
def test_use_cpu_cores_gives_jax_its_devices_per_core(flags, want):
    """Before JAX starts, with no device count set: DEVICES_PER_CORE CPU devices per core; a
    count the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    out = subprocess.run([sys.executable, "-c", CORES], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    n, count, per_host = out.stdout.split()[-3:]
    if want is None:
        assert n == per_host and int(count) == int(per_host) >= 2
    else:
        assert n == "None" and int(count) == want
