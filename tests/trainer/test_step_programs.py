"""`trainer.programs.StepPrograms`: each batch's line count follows the rule (reuse a count met
within a quarter of the batch, else round up to sixteenths) against a brute-force oracle; the
program of the next count is prepared in the background, so the step that first meets it neither
traces nor compiles on the calling thread, and its results equal a plain call's."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora
from arca_jax.batch import Batch
from arca_jax.grpo import GRPOConfig, TrainState, make_train_step
from arca_jax.grpo.step import make_optimizer
from arca_jax.trainer.programs import StepPrograms, needed_lines
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


def oracle_lines(needed: int, have, rows: int) -> int:
    """The rule by enumeration: every L from needed up, the first that is a count met within a
    quarter of the batch; else the first multiple of g = rows // 16 from needed, plus g (capped
    at rows)."""
    for c in range(needed, needed + max(1, rows // 4)):
        if c in have:
            return c
    g = max(1, rows // 16)
    return min(next(c for c in range(needed, rows + g + 1) if c % g == 0) + g, rows)


@pytest.mark.parametrize("rows", [6, 16, 50, 128])
def test_line_counts_follow_the_rule(rows):
    rng = np.random.default_rng(rows)
    for _ in range(20):
        have = set(rng.choice(np.arange(1, rows + 1), size=int(rng.integers(0, 4)),
                              replace=False).tolist())
        programs = StepPrograms(None, rows=rows, known=have)
        for needed in range(1, rows + 1):
            assert programs.lines_for(needed) == oracle_lines(needed, have, rows), (have, needed)
    # a batch gets the count for its first-fit need: 16 rows of 7 tokens in lines of 16 -> 8
    assert needed_lines(batch(0, 0).attention_mask) == 8
    assert StepPrograms(None, rows=B, known=[10]).pack(batch(0, 0)).packing.lines == 10
    assert StepPrograms(None, rows=B, known=[12]).pack(batch(0, 0)).packing.lines == 9  # 8 + g


def test_next_line_count_is_ready_before_the_step_needs_it(events):
    params = random_params(CFG, seed=0)
    tree = random_adapter(CFG, LCFG, seed=1)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    step = make_train_step(CFG, GRPOConfig(weighting="arca"), opt, lora_scale=LCFG.scaling)
    # g = 1; a run that has met 8 lines: a batch needing 8 reuses them and the program of a
    # batch needing 9 (8 + g) is prepared: 9 rounded, plus g, 10 lines
    programs = StepPrograms(step, rows=B, known=[8])
    short = programs.pack(batch(0, 0))
    assert short.packing.lines == 8
    state = TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0))
    state, _ = programs(state, params, short)
    programs.wait()  # for the preparations queued after the first call
    assert programs.prepared == {8: "met", 10: "ready"}
    long_ = programs.pack(batch(4, 1))  # 4 long rows + 12 short in pairs: needs 10 lines
    assert long_.packing.lines == 10
    main = threading.current_thread().name
    before = events.on(main)
    state, got = programs(state, params, long_, ahead=False)
    jax.block_until_ready(got)
    assert events.on(main) == before  # no trace, no compile on the calling thread
    assert events.on("arca-step-programs_0") >= 2  # 10's trace and compile

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
    programs = StepPrograms(step, rows=B, known=[8])
    short = programs.pack(batch(0, 0))
    state = TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0))
    state, _ = programs(state, params, short)
    main = threading.current_thread().name
    before = events.on(main)
    long_ = programs.pack(batch(4, 1))  # at once: 10's preparation is still running
    assert long_.packing.lines == 10 and programs.prepared[10] == "pending"
    state, _ = programs(state, params, long_, ahead=False)
    assert events.on(main) == before  # waited for it rather than compiling it again
    programs.close()
    assert programs.prepared == {8: "met", 10: "met"} and programs.known == [8, 10]
