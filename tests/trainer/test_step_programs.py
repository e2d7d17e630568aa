"""`trainer.programs.StepPrograms`: the packed train step's programs for the neighbouring line
counts are prepared in the background, so the step that first meets one neither traces nor
compiles on the calling thread, and its results equal a plain call's."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, packing
from arca_jax.batch import Batch
from arca_jax.grpo import GRPOConfig, TrainState, make_train_step
from arca_jax.grpo.step import make_optimizer
from arca_jax.trainer.programs import StepPrograms
from fixtures import random_adapter, random_params, tiny_config, trees_close

CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
B, P, N = 16, 2, 14


def batch(long_rows: int, seed: int) -> Batch:
    """B rows of P prompt tokens: `long_rows` with 12-token completions (one row per line of
    T = 16 slots), the rest with 5 (two per line); packed: long_rows + (B - long_rows) / 2 lines."""
    rng = np.random.default_rng(seed)
    T = P + N
    am = np.zeros((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b in range(B):
        n = 12 if b < long_rows else 5
        am[b, :P + n] = 1
        cm[b, P:P + n] = 1
    ids = np.where(am == 1, rng.integers(1, CFG.vocab_size, (B, T)), 0).astype(np.int32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                 completion_mask=jnp.asarray(cm),
                 advantages=jnp.asarray(rng.normal(size=B).astype(np.float32)))


class CompileEvents:
    """Counts jax's trace and backend-compile events, per thread."""

    NAMES = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seen = []

    def __call__(self, event, duration, **kw):
        if event in self.NAMES:
            self.seen.append((event, threading.current_thread().name))

    def on(self, thread_name: str) -> int:
        return sum(t == thread_name for _, t in self.seen)


@pytest.fixture
def events():
    ev = CompileEvents()
    jax.monitoring.register_event_duration_secs_listener(ev)
    yield ev
    jax.monitoring.unregister_event_duration_listener(ev)


def test_neighbouring_line_counts_are_ready_before_the_step_needs_them(events):
    params = random_params(CFG, seed=0)
    tree = random_adapter(CFG, LCFG, seed=1)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    step = make_train_step(CFG, GRPOConfig(weighting="arca"), opt, lora_scale=LCFG.scaling)
    m = B // 4
    short, long_ = packing.pack(batch(0, 0), multiple=m), packing.pack(batch(8, 1), multiple=m)
    assert (short.packing.lines, long_.packing.lines) == (8, 12)  # neighbours: 8 and 12

    programs = StepPrograms(step, multiple=m, rows=B)
    # which neighbour a batch leans towards: 8 of 8 lines filled -> 12; 12 of 12 -> 16;
    # 9 of 12 (2 long rows + 14 short in pairs) -> 8
    assert programs.leaning(short) == 12 and programs.leaning(long_) == 16
    assert programs.leaning(packing.pack(batch(2, 2), multiple=m)) == 8
    state = TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0))
    state, _ = programs(state, params, short)
    programs.wait()  # for the preparations queued after the first call
    assert programs.prepared == {8: "met", 12: "ready"}
    main = threading.current_thread().name
    before = events.on(main)
    state, got = programs(state, params, long_, ahead=False)
    jax.block_until_ready(got)
    assert events.on(main) == before  # no trace, no compile on the calling thread
    assert events.on("arca-step-programs_0") >= 2  # 12's trace and compile

    # the same second step, called plainly on a fresh step function: equal results
    plain = make_train_step(CFG, GRPOConfig(weighting="arca"), opt, lora_scale=LCFG.scaling)
    ref_state, _ = plain(TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0)), params, short)
    ref_state, ref = plain(ref_state, params, long_)
    trees_close(got, ref)
    trees_close(state.lora, ref_state.lora)
    programs.close()


def test_a_step_waits_for_its_program_in_preparation(events):
    params = random_params(CFG, seed=0)
    tree = random_adapter(CFG, LCFG, seed=1)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    step = make_train_step(CFG, GRPOConfig(weighting="uniform"), opt, lora_scale=LCFG.scaling)
    m = B // 4
    short, long_ = packing.pack(batch(0, 0), multiple=m), packing.pack(batch(8, 1), multiple=m)
    programs = StepPrograms(step, multiple=m, rows=B)
    state = TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0))
    state, _ = programs(state, params, short)
    main = threading.current_thread().name
    before = events.on(main)
    # at once: 12's preparation is still running
    assert programs.prepared[12] == "pending"
    state, _ = programs(state, params, long_, ahead=False)
    assert events.on(main) == before  # waited for it rather than compiling it again
    programs.close()
    assert programs.prepared == {8: "met", 12: "met"}
