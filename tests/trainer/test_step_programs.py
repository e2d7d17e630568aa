"""`trainer.programs.StepPrograms`: each batch's line count is its need rounded up to quarters of
the batch; the program of the next count up is prepared in the background, so the step that first
meets it neither traces nor compiles on the calling thread, and its results equal a plain
call's; a step waits for its program in preparation rather than compiling it twice."""

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
    """Counts jax's trace and backend-compile events, per thread, but not those of eager
    staging (jax's "stage" programs, which convert a constant once per shape on whichever
    thread meets it first: a race between the calling thread and the preparing one on a
    loaded host, not a program compiled twice)."""

    NAMES = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
    EAGER = ("stage", "jit(stage)")

    def __init__(self):
        self.seen = []

    def __call__(self, event, duration, **kw):
        if event in self.NAMES and kw.get("fun_name") not in self.EAGER:
            self.seen.append((event, threading.current_thread().name))

    def on(self, thread_name: str) -> int:
        return sum(t == thread_name for _, t in self.seen)


@pytest.fixture
def events():
    ev = CompileEvents()
    jax.monitoring.register_event_duration_secs_listener(ev)
    yield ev
    jax.monitoring.unregister_event_duration_listener(ev)


@pytest.mark.parametrize("rows", [6, 16, 50, 128])
def test_line_counts_are_quarters_of_the_batch(rows):
    programs = StepPrograms(None, rows=rows)
    q = max(1, rows // 4)
    for needed in range(1, rows + 1):  # the smallest multiple of q holding the batch
        assert programs.lines_for(needed) == next(c for c in range(needed, needed + q) if c % q == 0)
    # a batch gets the count for its first-fit need: 16 rows of 7 tokens in lines of 16 -> 8
    assert packing.plan(batch(0, 0).attention_mask).lines == 8
    assert StepPrograms(None, rows=B).pack(batch(0, 0)).packing.lines == 8
    assert StepPrograms(None, rows=B).pack(batch(2, 0)).packing.lines == 12  # needs 9


def step_setup(weighting: str):
    """(params, a fresh train state maker, a jitted train step) of the tiny model."""
    params = random_params(CFG, seed=0)
    tree = random_adapter(CFG, LCFG, seed=1)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    fresh = lambda: TrainState.create(jax.tree.map(jnp.copy, tree), opt, jax.random.PRNGKey(0))
    make = lambda: make_train_step(CFG, GRPOConfig(weighting=weighting), opt,
                                   lora_scale=LCFG.scaling)
    return params, fresh, make


def test_next_line_count_is_ready_before_the_step_needs_it(events):
    params, fresh, make = step_setup("arca")
    # quarters of B = 16: 8 lines, all filled (within B / 8 of the count): 12 is prepared
    programs = StepPrograms(make(), rows=B)
    short = programs.pack(batch(0, 0))
    assert short.packing.lines == 8
    state, _ = programs(fresh(), params, short)
    programs.wait()  # for the preparations queued after the first call
    assert programs.prepared == {8: "met", 12: "ready"}
    long_ = programs.pack(batch(4, 1))  # 4 long rows + 12 short in pairs: needs 10 lines
    assert long_.packing.lines == 12
    main = threading.current_thread().name
    before = events.on(main)
    state, got = programs(state, params, long_, ahead=False)
    jax.block_until_ready(got)
    assert events.on(main) == before  # no trace, no compile on the calling thread
    assert events.on("arca-step-programs_0") >= 2  # 12's trace and compile

    # the same second step, called plainly on a fresh step function: equal results
    plain = make()
    ref_state, _ = plain(fresh(), params, short)
    ref_state, ref = plain(ref_state, params, long_)
    trees_close(got, ref)
    trees_close(state.lora, ref_state.lora)
    programs.close()


def test_a_step_waits_for_its_program_in_preparation(events):
    params, fresh, make = step_setup("uniform")
    programs = StepPrograms(make(), rows=B)
    state, _ = programs(fresh(), params, programs.pack(batch(0, 0)))
    main = threading.current_thread().name
    before = events.on(main)
    long_ = programs.pack(batch(4, 1))  # at once: 12's preparation is still running
    assert long_.packing.lines == 12 and programs.prepared[12] == "pending"
    state, _ = programs(state, params, long_, ahead=False)
    assert events.on(main) == before  # waited for it rather than compiling it again
    programs.close()
    assert programs.prepared == {8: "met", 12: "met"}


def grouped(seed: int, G: int = 4) -> Batch:
    """`batch(0, seed)` as GRPO groups: G consecutive rows share their prompt (build_batch's
    prompt width P set)."""
    b = batch(3, seed)
    ids = np.asarray(b.input_ids).copy()
    ids[:, :P] = np.repeat(ids[::G, :P], G, axis=0)
    return b.replace(input_ids=jnp.asarray(ids), prompt_width=P)


def test_shared_prompts_count_quarters_of_the_slots_and_equal_a_plain_step():
    programs = StepPrograms(None, rows=B, share_prompts=True)
    assert (programs.multiple, programs.max_lines) == (B // 8, B // 2)  # lines of 2 T slots
    T = P + N
    b = programs.pack(grouped(0))
    pk = b.packing
    assert pk.prefix is not None and pk.src.shape[1] == 2 * T and pk.lines % (B // 8) == 0
    assert (np.asarray(pk.segments) > 0).sum() < np.asarray(b.attention_mask).sum()  # 1 prompt/line
    # a batch that does not know its prompt columns packs unshared, in lines of T
    plain = programs.pack(grouped(0).replace(prompt_width=None)).packing
    assert plain.prefix is None and plain.src.shape[1] == T and plain.lines % (B // 4) == 0

    params, fresh, make = step_setup("arca")
    step = make()
    shared = StepPrograms(step, rows=B, share_prompts=True)
    s_got, got = shared(fresh(), params, b, ahead=True)
    s_ref, ref = step(fresh(), params, grouped(0))  # padded rows
    trees_close(got, ref)
    trees_close(s_got.lora, s_ref.lora)
    # a batch filling its lines queues the next count, whose abstract batch has prefix ids too
    full = packing.pack(grouped(0), share_prompts=True, width=2 * T)
    assert StepPrograms.filled(full) == full.packing.lines
    shared.close()
    ahead = StepPrograms(make(), rows=B, share_prompts=True)
    ahead(fresh(), params, full, ahead=True)
    ahead.wait()
    assert ahead.prepared == {full.packing.lines: "met", full.packing.lines + 1: "ready"}
    ahead.close()
    # with a store nothing is prepared ahead; the stored program gives the jitted step's result
    import tempfile
    from arca_jax.trainer.executables import ExecutableStore
    stored = StepPrograms(make(), rows=B, share_prompts=True,
                          store=ExecutableStore(tempfile.mkdtemp(), "test"))
    s_sto, sto = stored(fresh(), params, full, ahead=True)
    assert stored.prepared == {full.packing.lines: "met"}
    s_ahe, ahe = StepPrograms(make(), rows=B, share_prompts=True)(fresh(), params, full,
                                                                  ahead=False)
    trees_close(sto, ahe, tol=0.0)
    trees_close(s_sto.lora, s_ahe.lora, tol=0.0)


def test_wider_shared_lines_count_quarters_of_the_slots_and_equal_a_plain_step():
    """Lines of 4 T (the CPU kernel's default): B / 16 lines per quarter, one prompt copy for a
    whole group, and the step's results those of the padded rows."""
    T = P + N
    programs = StepPrograms(None, rows=B, share_prompts=True, line_width=4)
    assert (programs.multiple, programs.max_lines) == (B // 16, B // 4)
    b = programs.pack(grouped(0))
    pk = b.packing
    assert pk.src.shape[1] == 4 * T and pk.lines == StepPrograms.filled(b) < B // 4  # no padding
    copies = (np.asarray(pk.segments) > B).sum()
    assert copies == (B // 4) * P  # one prompt copy per group
    narrow = StepPrograms(None, rows=B, share_prompts=True).pack(grouped(0)).packing
    assert (np.asarray(narrow.segments) > B).sum() > copies
    with pytest.raises(ValueError, match="line_width"):
        StepPrograms(None, rows=B, share_prompts=True, line_width=0)
    params, fresh, make = step_setup("arca")
    step = make()
    s_got, got = StepPrograms(step, rows=B, share_prompts=True, line_width=4)(
        fresh(), params, b, ahead=False)
    s_ref, ref = step(fresh(), params, grouped(0))  # padded rows
    trees_close(got, ref)
    trees_close(s_got.lora, s_ref.lora)


def test_line_width_follows_the_attention():
    from arca_jax import config, qwen3
    from arca_jax.trainer import setup

    class M:  # what setup.line_width reads of a loaded model
        params = {"embed_tokens": {"embedding": jnp.zeros((2, 2), jnp.float32)}}

    kernel = qwen3.resolve_attention("auto", jnp.float32) == "cpu-kernel"
    assert setup.line_width(config.load(None, []), M) == (4 if kernel else 2)
    assert setup.line_width(config.load(None, ["grpo.attention=einsum"]), M) == 2
    assert setup.line_width(config.load(None, ["train.line_width=3"]), M) == 3
    for bad in ("0", "true"):
        with pytest.raises(Exception, match="line_width"):
            config.load(None, [f"train.line_width={bad}"])
