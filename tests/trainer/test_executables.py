"""`trainer.executables.ExecutableStore`: compiled programs found again without tracing (a new
process runs a stored program whose Python function would fail if traced), keyed by the static
text, the arguments' signature and the environment; written only when compiled by the store's
own call; damaged entries recompiled; bounded. And the trainer's use: `setup.step_static`
changes with every input of the step, not with the seed; a second run loads its steps and
reproduces the first exactly; the sampler's programs stored and loaded with the same tokens."""

import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import config, train
from arca_jax.trainer import executables, setup
from arca_jax.trainer.executables import ExecutableStore
from fixtures import TIMING, read_jsonl


def program(x, tree):
    return {"y": x @ tree["w"] + jnp.sin(tree["b"]) * 3.25}, (x @ tree["w"] * tree["b"]).sum()


def arguments(n=5):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    return x, {"w": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


PROCESS = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from arca_jax.trainer.executables import ExecutableStore
{program}
{arguments}
def traced(*args):
    raise AssertionError("traced: the store missed")

store = ExecutableStore({directory!r}, "static-a")
fn = program if sys.argv[1] == "write" else traced
out = store.compiled("program", jax.jit(fn), arguments())(*arguments())
print(store.hits, store.writes)
np.save(sys.argv[2], np.asarray(out[0]["y"]))
"""


def test_a_new_process_runs_the_stored_program_without_tracing(tmp_path):
    """One process compiles and stores; a second one, whose function fails if traced, loads
    and runs it: the same outputs."""
    code = PROCESS.format(program=inspect.getsource(program),
                          arguments=inspect.getsource(arguments),
                          directory=str(tmp_path / "store"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device (the trainer's)

    def run(mode):
        out = subprocess.run([sys.executable, "-c", code, mode, str(tmp_path / f"{mode}.npy")],
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-2:]

    assert run("write") == ["0", "1"]  # compiled and written
    assert run("load") == ["1", "0"]  # loaded, nothing compiled or written
    np.testing.assert_array_equal(np.load(tmp_path / "load.npy"), np.load(tmp_path / "write.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "load.npy"),
                               np.asarray(program(*arguments())[0]["y"]), rtol=1e-5)


def test_keys_follow_static_text_and_signature(tmp_path):
    a = ExecutableStore(str(tmp_path), "static-a")
    same = ExecutableStore(str(tmp_path), "static-a")
    other = ExecutableStore(str(tmp_path), "static-b")
    args = arguments()
    assert a.path("p", args) == same.path("p", args)
    assert a.path("p", args) != other.path("p", args)
    assert a.path("p", args) != a.path("q", args)
    assert a.path("p", args) != a.path("p", arguments(6))  # shapes
    x, tree = args
    assert a.path("p", args) != a.path("p", (x.astype(jnp.bfloat16), tree))  # dtypes
    precision = jax.config.jax_default_matmul_precision
    try:  # jax's options are part of the key (the tests run at "highest")
        jax.config.update("jax_default_matmul_precision", "bfloat16")
        assert ExecutableStore(str(tmp_path), "static-a").path("p", args) != a.path("p", args)
    finally:
        jax.config.update("jax_default_matmul_precision", precision)


def test_written_only_when_the_call_compiled_it(tmp_path):
    def fresh(x, tree):  # a program no other test compiles
        return {"y": x @ tree["w"] - 1.5}, jnp.cos(x).sum()

    jitted = jax.jit(fresh)
    jitted.lower(*arguments()).compile()  # now in JAX's in-memory cache
    store = ExecutableStore(str(tmp_path), "static")
    store.compiled("fresh", jitted, arguments())
    assert store.writes == 0  # came from the in-memory cache: not known to be a fresh compile

    class FromPersistentCache:  # JAX's persistent cache hands the program over (a hit event)
        def __init__(self, always):
            self.always, self.options = always, []

        def lower(self, *args):
            lowered, outer = jax.jit(program).lower(*args), self

            class L:
                def compile(self, compiler_options=None):
                    outer.options.append(compiler_options)
                    if compiler_options is None or outer.always:
                        jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
                    return lowered.compile(compiler_options=compiler_options)
            return L()

    held = FromPersistentCache(always=False)  # held under the plain key only
    store.compiled("program", held, arguments(7))
    assert held.options == [None, executables.FRESH]  # compiled once more under another key
    assert store.writes == 1
    everywhere = FromPersistentCache(always=True)  # held under both keys: nothing written
    store.compiled("program", everywhere, arguments(12))
    assert everywhere.options == [None, executables.FRESH]
    assert store.writes == 1
    store.compiled("program", jax.jit(program), arguments(8))
    assert store.writes == 2


def test_a_damaged_entry_is_removed_and_the_program_compiled(tmp_path):
    def damaged(x, tree):  # a program no other test compiles (so this test's call compiles it)
        return {"y": x @ tree["w"] * 0.75}, jnp.tanh(x).sum()

    store = ExecutableStore(str(tmp_path), "static")
    path = store.path("damaged", arguments())
    with open(path, "wb") as f:
        f.write(b"not a pickled executable")
    again = ExecutableStore(str(tmp_path), "static")
    compiled = again.compiled("damaged", jax.jit(damaged), arguments())
    assert (again.hits, again.writes) == (0, 1)
    np.testing.assert_allclose(np.asarray(compiled(*arguments())[1]),
                               np.asarray(damaged(*arguments())[1]), rtol=1e-6)
    with open(path, "rb") as f:
        assert f.read() != b"not a pickled executable"  # rewritten by the compile


def test_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(executables, "MAX_ENTRIES", 2)
    store = ExecutableStore(str(tmp_path), "static")
    for n in (9, 10, 11):
        store.compiled("program", jax.jit(program), arguments(n))
    assert store.writes == 3
    assert len([f for f in os.listdir(tmp_path) if f.endswith(executables.SUFFIX)]) == 2


RUN = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
       "rollout.max_new_tokens=16", "rollout.max_prompt_tokens=15", "task.num_eval_problems=2",
       "task.max_train_samples=16", "train.save_every=0", "train.eval_every=0",
       "train.samples_every=0", "grpo.weighting=arca"]


def test_step_static_names_every_input_of_the_step():
    from fixtures import tiny_config

    model = tiny_config()
    base = setup.step_static(config.load(None, RUN), model)
    for change in ("optim.learning_rate=0.5", "optim.warmup_steps=3", "train.steps=7",
                   "lora.alpha=3.0", "lora.dropout=0.1", "grpo.weighting=uniform",
                   "grpo.sharpening=2.0", "grpo.num_iterations=2", "train.share_prompts=false",
                   "grpo.attention_blocks=2"):
        assert setup.step_static(config.load(None, RUN + [change]), model) != base, change
    assert setup.step_static(config.load(None, RUN), tiny_config(rope_theta=5e5)) != base
    for same in ("train.seed=5", "train.eval_every=1", "task.num_eval_problems=3"):
        assert setup.step_static(config.load(None, RUN + [same]), model) == base, same


def test_sampler_programs_stored_and_loaded(tmp_path):
    """`sampling.generate(store=...)`: the four programs written by a first call, loaded by a
    second store on the same directory; the same tokens and log-probs as plain jit, LoRA on."""
    from arca_jax import lora, sampling
    from fixtures import random_adapter, random_params, tiny_config

    cfg = tiny_config(vocab_size=37)  # a model no other test samples from
    params = random_params(cfg, seed=0)
    tree = random_adapter(cfg, lora.LoraConfig(rank=4, alpha=8.0), seed=1, scale=0.2)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 37, (4, 6)), jnp.int32)
    run = lambda store: sampling.generate(  # noqa: E731
        params, ids, jnp.ones_like(ids), config=cfg, rng=jax.random.PRNGKey(1),
        max_new_tokens=10, eos_id=3, lora=tree, lora_scale=2.0, group_size=2, store=store)
    first = ExecutableStore(str(tmp_path), "sampling.generate")
    a = run(first)
    assert (first.hits, first.writes) == (0, 4)
    second = ExecutableStore(str(tmp_path), "sampling.generate")
    b = run(second)
    assert (second.hits, second.writes) == (4, 0)
    ref = run(None)
    for x in (a, b):
        np.testing.assert_array_equal(np.asarray(x.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(x.logps), np.asarray(ref.logps))


def test_replica_sampler_stored_and_loaded_on_its_devices(tmp_path):
    """`sampling.generate(devices=..., store=...)`: the weights' program and the replicas' one
    (on two devices) written by a first call, loaded by a second store onto the same two
    devices in order; the same tokens and log-probs as plain jit on one device."""
    from arca_jax import lora, sampling
    from fixtures import random_adapter, random_params, tiny_config

    cfg = tiny_config(vocab_size=41)  # a model no other test samples from
    params = random_params(cfg, seed=0)
    tree = random_adapter(cfg, lora.LoraConfig(rank=4, alpha=8.0), seed=1, scale=0.2)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 41, (8, 6)), jnp.int32)
    devices = [jax.devices()[2], jax.devices()[1]]  # not in id order: the order is kept
    run = lambda store, devices: sampling.generate(  # noqa: E731
        params, ids, jnp.ones_like(ids), config=cfg, rng=jax.random.PRNGKey(1),
        max_new_tokens=10, eos_id=3, lora=tree, lora_scale=2.0, group_size=2, store=store,
        devices=devices)
    first = ExecutableStore(str(tmp_path), "sampling.generate")
    a = run(first, devices)
    assert (first.hits, first.writes) == (0, 2)
    second = ExecutableStore(str(tmp_path), "sampling.generate")
    b = run(second, devices)
    assert (second.hits, second.writes) == (2, 0)
    ref = run(None, None)
    for x in (a, b):
        assert x.tokens.sharding.device_set == {devices[0]}
        np.testing.assert_array_equal(np.asarray(x.tokens), np.asarray(ref.tokens))
        np.testing.assert_allclose(np.asarray(x.logps), np.asarray(ref.logps), atol=1e-6)


def test_store_rule():
    cfg = config.load(None, RUN)
    from fixtures import tiny_config

    model = tiny_config()
    assert setup.step_store(cfg, model) is not None  # CPU, one process, cache on (conftest)
    for off in ("train.store_programs=false", "train.prepare_ahead=true", "train.mode=pmap"):
        assert setup.step_store(config.load(None, RUN + [off]), model) is None, off
    from arca_jax import credit

    def own(residual_norms):
        return residual_norms

    for module in ("my_weightings", None):  # None: a function from code run by exec
        own.__module__ = module
        credit.register("store_rule_own", needs=("residual_norms",), fn=own, replace=True)
        try:  # a weighting outside this package: its helpers are not in the key
            assert setup.step_store(config.load(None, RUN + ["grpo.weighting=store_rule_own"]),
                                    model) is None
        finally:
            credit.unregister("store_rule_own")
    assert setup.sampler_store(cfg, None) is setup.sampler_store(cfg, None)  # one per process
    assert setup.sampler_store(config.load(None, RUN + ["train.prepare_ahead=true"]),
                               None) is not None
    assert setup.sampler_store(cfg, object()) is None  # a mesh
    with pytest.raises(ValueError, match="exclude each other"):
        config.load(None, RUN + ["train.store_programs=true", "train.prepare_ahead=true"])


def test_second_run_loads_its_steps_and_reproduces_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ARCA_JAX_PROGRAM_STORE", str(tmp_path / "steps"))
    # a learning rate no other test uses: a program JAX's shared test cache cannot hold yet
    cfg = config.load(None, RUN + ["optim.learning_rate=0.0123"])
    train.train(cfg, str(tmp_path / "a"))
    written = sorted(os.listdir(tmp_path / "steps"))
    assert written
    jax.clear_caches()  # nothing of the first run in memory
    capsys.readouterr()
    train.train(cfg, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "steps")) == written
    steps = [f for f in written if f.startswith("train_step-")]
    assert steps and len(written) > len(steps)  # the sampler's programs too
    out = capsys.readouterr()
    assert f"{len(steps)} loaded, 0 written" in out.out + out.err
    rows = [[{k: v for k, v in r.items() if k not in TIMING}
             for r in read_jsonl(str(tmp_path / d / "metrics.jsonl"))] for d in "ab"]
    assert rows[0] == rows[1]
