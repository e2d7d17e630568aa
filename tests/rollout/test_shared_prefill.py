"""Shared prompt prefill (`generate(group_size=G)`): each prompt of a GRPO group is run through
the model once and its keys, values and logits serve its G rows; the completions equal those of
prefilling every row, for the same key."""

import jax
import numpy as np
import pytest

from arca_jax import lora, parallel, prompts, sampling
from fixtures import frequent_token, left_padded_batch, random_adapter, random_params, tiny_config

CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
G = 4
N = 12  # new tokens
SAMPLED = dict(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def setup():
    """(params, adapter, the grouped prompts, an end-of-sequence token): the token the sampled
    completions hold most often, so that rows end at different steps (a real GRPO batch)."""
    params = random_params(CFG, seed=0, scale=2.0)
    tree = random_adapter(CFG, LCFG, seed=1, scale=0.2)
    ids, mask = left_padded_batch(CFG.vocab_size, [3, 5, 7, 2], 7, seed=0)
    ids, mask = prompts.repeat_groups(ids, mask, G)
    eos = frequent_token(params, CFG, ids, mask, new=N, lora=tree, lora_scale=LCFG.scaling,
                         **SAMPLED)
    return params, tree, (ids, mask), eos


@pytest.mark.parametrize("kw", [dict(greedy=True), SAMPLED],
                             ids=["greedy", "sampled"])
@pytest.mark.parametrize("on_mesh", [False, True], ids=["one-device", "mesh"])
def test_shared_prefill_equals_per_row_prefill(setup, kw, on_mesh):
    params, tree, (ids, mask), eos = setup
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2) if on_mesh else None
    gen = dict(config=CFG, rng=jax.random.PRNGKey(3), max_new_tokens=N, lora=tree,
               lora_scale=LCFG.scaling, eos_id=eos, mesh=mesh, **kw)
    plain = sampling.generate(params, ids, mask, **gen)
    shared = sampling.generate(params, ids, mask, group_size=G, **gen)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(plain.mask))
    np.testing.assert_allclose(np.asarray(shared.logps), np.asarray(plain.logps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared.sampled_logps), np.asarray(plain.sampled_logps),
                               atol=1e-5)
    if "temperature" in kw:  # rows of one group differ, some end early: a real GRPO batch
        lengths = np.asarray(plain.lengths)
        assert len(set(lengths.tolist())) > 2 and lengths.min() < N
        assert (np.asarray(plain.tokens)[0] != np.asarray(plain.tokens)[1]).any()


def test_group_size_must_divide_the_rows(setup):
    params, _, (ids, mask), _ = setup
    with pytest.raises(ValueError, match="group_size 3 must be >= 1 and divide the 16 rows"):
        sampling.generate(params, ids, mask, config=CFG, rng=jax.random.PRNGKey(0),
                          max_new_tokens=4, group_size=3)
