"""Continuous refill (`generate(max_batch=S)`): S slots decode B > S rows, a row that ends hands
its slot to the next waiting row. Each row's completion equals that of one batch of all B rows
for the same key, whatever the slot count, the admission width, the groups or the mesh."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, parallel, sampling
from arca_jax.plan import hlostats
from fixtures import assert_same_rows, grouped_rollout, tiny_config

CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
G = 4
N = 16
SAMPLED = dict(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def setup():
    """(params, the grouped prompts (16 rows), generate's keywords): the end-of-sequence token is
    the one sampled completions hold most often, so rows end at different steps."""
    return grouped_rollout(CFG, LCFG, [3, 5, 7, 2], G, N, **SAMPLED)


@pytest.mark.parametrize("kw, slots, admit, group", [
    (SAMPLED, 4, 1, 1),         # admitted one row at a time
    (SAMPLED, 8, 4, G),         # whole groups, each prompt prefilled once per admission
    (SAMPLED, 2, 2, 1),         # two slots for sixteen rows
    (dict(greedy=True), 4, 4, G),
], ids=["one-at-a-time", "groups", "two-slots", "greedy"])
def test_refill_equals_one_batch(setup, kw, slots, admit, group):
    params, ids, mask, gen = setup
    rng = jax.random.PRNGKey(3)
    plain = sampling.generate(params, ids, mask, rng=rng, **gen, **kw)
    refill = sampling.generate(params, ids, mask, rng=rng, max_batch=slots, admit_rows=admit,
                               group_size=group, **gen, **kw)
    assert_same_rows(refill, plain)
    lengths = np.asarray(plain.lengths)
    if "temperature" in kw:  # a real test: rows end at different steps, some at the limit
        assert len(set(lengths.tolist())) > 3 and lengths.min() < N
        assert np.asarray(plain.finished).any() and not np.asarray(plain.finished).all()
    # one batch: every slot runs to the longest row; refill: rows wait for a slot instead
    B = ids.shape[0]
    assert int(plain.slot_steps) == B * int(plain.num_steps)
    assert lengths.sum() <= int(refill.slot_steps)
    if admit == 1 or slots == 2:  # slots refilled as soon as they free: less idle work
        assert int(refill.slot_steps) < int(plain.slot_steps)


def test_refill_on_a_mesh(setup):
    """Slots over ("data", "fsdp"), kv heads over "tensor"; rows admitted across devices."""
    params, ids, mask, gen = setup
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    rng = jax.random.PRNGKey(7)
    plain = sampling.generate(params, ids, mask, rng=rng, **gen, **SAMPLED)
    refill = sampling.generate(params, ids, mask, rng=rng, mesh=mesh, max_batch=8, admit_rows=4,
                               group_size=G, **gen, **SAMPLED)
    assert_same_rows(refill, plain)


def test_pallas_decode_attention_gives_the_same_rows(setup):
    """decode_attention="pallas" (the GPU kernel, in Pallas' interpreter here) against "dot", with
    refill, groups, LoRA and EOS at different steps: the same tokens, log-probs within 1e-5."""
    params, ids, mask, gen = setup
    rng = jax.random.PRNGKey(5)
    kw = dict(max_batch=8, admit_rows=4, group_size=G, **gen, **SAMPLED)
    dot = sampling.generate(params, ids, mask, rng=rng, decode_attention="dot", **kw)
    pallas = sampling.generate(params, ids, mask, rng=rng, decode_attention="pallas", **kw)
    assert_same_rows(pallas, dot)
    assert len(set(np.asarray(dot.lengths).tolist())) > 3
    one = parallel.make_mesh(data=1, devices=jax.devices()[:1])  # the trainer's single-GPU mesh
    assert_same_rows(sampling.generate(params, ids, mask, rng=rng, decode_attention="pallas",
                                       mesh=one, **kw), dot)
    # on a mesh the kernel runs per device: its rows, and with tensor > 1 its kv heads
    for shape in ((2, 1, 1), (2, 2, 2)):
        mesh = parallel.make_mesh(*shape)
        assert_same_rows(sampling.generate(params, ids, mask, rng=rng, decode_attention="pallas",
                                           mesh=mesh, **kw), dot)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")  # shrink: fewer slots
@pytest.mark.parametrize("shrink", [0, 1])
def test_refill_steps_update_the_cache_in_place(setup, shrink):
    """The compiled decode loop with refill copies no cache array at a step: admission runs
    between loops of plain steps, not as a conditional inside the steps' loop body, whose
    branches XLA gave copies of the loop state (every layer's keys and values, every step)."""
    params, ids, mask, gen = setup
    config = gen["config"]
    settings = sampling.SamplingConfig(max_new_tokens=N, eos_ids=(gen["eos_id"],))
    weights = sampling.prepare_weights_jit(params, config, lora=gen["lora"],
                                           lora_scale=jnp.float32(gen["lora_scale"]))
    state = sampling.prefill_jit(weights, ids, mask, config=config, settings=settings,
                                 rng=jax.random.PRNGKey(0), limit=jnp.int32(N), group_size=G,
                                 slots=8, admit_rows=4)
    hlo = sampling.decode_jit.lower(weights, state, config=config, settings=settings,
                                    shrink=shrink).compile().as_text()
    copies = [i.type for i in hlostats.loop_instructions(hlo) if i.opcode == "copy"]
    assert copies  # the loops' small copies (scalars, row indices) are found
    for shape in {tuple(a.shape) for a in (*state.cache.k, *state.cache.v)}:
        cache = "f32[" + ",".join(map(str, shape)) + "]"
        assert not [c for c in copies if c.startswith(cache)], f"a copy of a cache array {cache}"


def test_refill_settings_are_checked(setup):
    params, ids, mask, gen = setup
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="divide the 16 rows and the 6 slots"):
        sampling.generate(params, ids, mask, rng=rng, max_batch=6, group_size=G, **gen)
    with pytest.raises(ValueError, match="admit_rows 3 must be a multiple of group_size 1"):
        sampling.generate(params, ids, mask, rng=rng, max_batch=2, admit_rows=3, **gen)
    # max_batch >= B is one batch
    one = sampling.generate(params, ids, mask, rng=rng, max_batch=64, **gen)
    assert int(one.slot_steps) == ids.shape[0] * int(one.num_steps)


def _shrunk_slot_steps(lengths, sizes) -> int:
    """Slot-steps of one batch of len(lengths) slots that halves through `sizes`: prefill counts
    every slot; decode step j (columns 1, 2, ...) counts the slots of its loop, and a loop gives
    way to the next size once no more rows than that run (a row of length L runs before steps
    1 .. L - 1)."""
    lengths = np.asarray(lengths)
    slots = total = len(lengths)
    j = 1
    for n in (*sizes, 0):
        while (lengths > j).sum() > n:
            total += slots
            j += 1
        slots = n
    return total


@pytest.mark.parametrize("extra", [{}, dict(group_size=G),
                                   dict(max_batch=8, admit_rows=4, group_size=G)],
                         ids=["rows", "groups", "after-refill"])
def test_shrinking_slots_equals_one_batch(setup, extra):
    """generate(shrink=3): as rows end, the running ones move into 8, 4, then 2 slots; each row's
    completion is the one batch's, and the ended rows' slots stop costing steps."""
    params, ids, mask, gen = setup
    rng = jax.random.PRNGKey(3)
    plain = sampling.generate(params, ids, mask, rng=rng, **gen, **SAMPLED)
    shrunk = sampling.generate(params, ids, mask, rng=rng, shrink=3, **gen, **SAMPLED, **extra)
    assert_same_rows(shrunk, plain)
    lengths = np.asarray(plain.lengths)
    assert len(set(lengths.tolist())) > 3 and (lengths < N).sum() > ids.shape[0] // 2
    assert lengths.sum() <= int(shrunk.slot_steps) < int(plain.slot_steps)
    if "max_batch" not in extra:
        assert int(shrunk.slot_steps) == _shrunk_slot_steps(lengths, (8, 4, 2))


def test_shrinking_compiles_without_a_donation_warning(setup):
    """With shrink the decode program's output has fewer slots than the state it was donated, so
    the slots' buffers cannot be taken over: `generate` does not pass jax's warning about that on
    to the user (the trainer samples with shrink on CPU by default)."""
    params, ids, mask, gen = setup
    jax.clear_caches()  # the decode program is lowered here, where jax would warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sampling.generate(params, ids, mask, rng=jax.random.PRNGKey(3), shrink=2,
                                **gen, **SAMPLED)
        jax.block_until_ready(out.tokens)
        weights = sampling.prepare_weights_jit(params, gen["config"])
        settings = sampling.SamplingConfig(max_new_tokens=N)
        donated = sampling.decode_jit.lower(  # the same lowering outside `generate` warns
            weights, sampling.prefill_jit(weights, ids, mask, config=gen["config"],
                                          settings=settings, rng=jax.random.PRNGKey(0)),
            config=gen["config"], settings=settings, shrink=2)
    messages = [str(w.message) for w in caught if "donated buffers" in str(w.message)]
    assert donated is not None and len(messages) == 1, messages


def test_shrinking_on_a_mesh_keeps_slots_split_evenly(setup):
    """On (data 2, fsdp 2, tensor 2) slots split over 4 row devices: 16 -> 8 -> 4, not 2."""
    params, ids, mask, gen = setup
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert sampling.shrink_sizes(16, 3, mesh) == (8, 4)
    assert sampling.shrink_sizes(16, 3) == (8, 4, 2)
    assert sampling.shrink_sizes(12, 5) == (6, 3)
    assert sampling.shrink_sizes(16, 0) == ()
    rng = jax.random.PRNGKey(3)
    plain = sampling.generate(params, ids, mask, rng=rng, **gen, **SAMPLED)
    shrunk = sampling.generate(params, ids, mask, rng=rng, mesh=mesh, shrink=3, group_size=G,
                               **gen, **SAMPLED)
    assert_same_rows(shrunk, plain)
    assert int(shrunk.slot_steps) == _shrunk_slot_steps(plain.lengths, (8, 4))
    with pytest.raises(ValueError, match="shrink must be an int >= 0"):
        sampling.generate(params, ids, mask, rng=rng, shrink=-1, **gen)


def test_shrink_resolves_per_platform_and_validates():
    """`rollout.shrink` None: `sampling.CPU_SHRINK` halvings on CPU, none on GPU and TPU; the
    trainer's config refuses negative halvings."""
    from arca_jax.config import RolloutConfig

    assert sampling.resolve_shrink(None, "cpu") == sampling.CPU_SHRINK > 0
    assert sampling.resolve_shrink(None, "gpu") == sampling.resolve_shrink(None, "tpu") == 0
    assert sampling.resolve_shrink(3, "tpu") == 3 and sampling.resolve_shrink(0, "cpu") == 0
    assert RolloutConfig().shrink is None
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="shrink must be"):
            sampling.resolve_shrink(bad)
    with pytest.raises(ValueError, match="shrink must be >= 0"):
        RolloutConfig(shrink=-1)
