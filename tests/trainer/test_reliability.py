"""Runs that survive faults (issue 17): resume without a checkpoint, `--resume` with nothing to
resume, damaged checkpoints, one-line YAML errors, the persistent compilation cache, a full disk
during a save, bad model output, and SIGKILL at seeded random moments of a run.

The runs use a fixed prompt width (`rollout.max_prompt_tokens=15`, shorter than every arithmetic
prompt, so every batch has one shape and each program compiles once) to stay small.
"""

import errno
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import checkpoint, cli, config, faults, runlog, tfevents, train
from arca_jax.batch import build_batch
from arca_jax.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError
from arca_jax.trainer import loop, setup
rollout_mod = importlib.import_module("arca_jax.trainer.rollout")  # the package exports rollout()
from fixtures import TIMING, read_jsonl

SMALL = ["train.steps=3", "rollout.prompts_per_step=2", "rollout.group_size=2",
         "rollout.max_new_tokens=48", "rollout.max_prompt_tokens=15",
         "task.num_eval_problems=2", "task.max_train_samples=32", "train.save_every=1",
         "train.eval_every=2", "train.samples_every=1", "train.samples_per_log=1",
         "grpo.weighting=arca", "grpo.sharpening=2.0", "optim.learning_rate=1e-2"]


def _cli_train(run_dir, *extra, overrides=SMALL):
    args = ["train", "--output-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    return cli.main(args + list(extra))


def _logs(run_dir):
    """The run's step logs without wall-clock fields: JSON lines, and TensorBoard scalars sorted
    (a resumed run spreads them over several event files; a repeated step shows twice)."""
    metrics = [{k: v for k, v in r.items() if k not in TIMING}
               for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
    scalars = sorted(s for s in tfevents.read_scalars(os.path.join(run_dir, "tb"))
                     if s.tag.split("/")[-1] not in TIMING)
    return {"metrics": metrics, "eval": read_jsonl(os.path.join(run_dir, "eval.jsonl")),
            "samples": read_jsonl(os.path.join(run_dir, "samples.jsonl")), "tensorboard": scalars}


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return {k: v for k, v in json.load(f).items() if k != "wall_time_s"}


def _final_state(run_dir):
    cfg = config.load(os.path.join(run_dir, "config.yaml"))
    model = setup.load_model(cfg)
    like = setup.init_state(cfg, model.config, setup.build_optimizer(cfg))
    c = setup.open_checkpoints(cfg, run_dir)
    try:
        state, _, step = c.restore(like)
    finally:
        c.close()
    return step, state


def _assert_states_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_dirs(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


@pytest.fixture(scope="module", autouse=True)
def one_train_step_per_config():
    """Test plumbing for speed: the runs of this module that share a config share one compiled
    train step (`make_train_step` builds a new jitted function per run, and its compilation
    dominates these small runs). The step is a pure function of these arguments."""
    mp = pytest.MonkeyPatch()
    build_optimizer, make_train_step = setup.build_optimizer, loop.make_train_step
    optimizers, steps = {}, {}

    def cached_optimizer(cfg):
        key = (cfg.optim, cfg.train.steps, cfg.grpo.num_iterations)
        if key not in optimizers:
            optimizers[key] = build_optimizer(cfg)
        return optimizers[key]

    def cached_step(model_config, grpo_config, optimizer, **kw):
        key = (model_config, grpo_config, id(optimizer), tuple(sorted(kw.items())))
        if key not in steps:
            steps[key] = make_train_step(model_config, grpo_config, optimizer, **kw)
        return steps[key]

    mp.setattr(setup, "build_optimizer", cached_optimizer)
    mp.setattr(loop, "make_train_step", cached_step)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    """An uninterrupted run of SMALL: the outputs every interrupted run must reproduce. It fills
    a persistent compilation cache that the subprocesses of the SIGKILL test then read."""
    from jax._src import compilation_cache

    run_dir = str(tmp_path_factory.mktemp("reliability") / "reference")
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        assert _cli_train(run_dir) == 0
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
    return run_dir


def _copy_run(reference, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(reference, dst)
    return dst


# --------------------------------------------------------------------------------------------
# 1, 2: resume without a checkpoint; --resume with nothing to resume
# --------------------------------------------------------------------------------------------


def test_reference_run_logs_every_step_once(reference):
    logs = _logs(reference)
    assert [m["step"] for m in logs["metrics"]] == [1, 2, 3]
    assert [e["step"] for e in logs["eval"]] == [0, 2, 3]
    assert [s["step"] for s in logs["samples"]] == [1, 2, 3]
    assert _step_dirs(reference) == ["2", "3"]  # keep_checkpoints=2
    for s in ("2", "3"):
        assert os.path.isfile(os.path.join(reference, "checkpoints", s, checkpoint.MANIFEST))
    for m in logs["metrics"]:
        assert m["reward_invalid"] == 0 and m["advantage_invalid"] == 0
        assert 0 <= m["completions_truncated"] <= 4 and m["completions_empty"] == 0


def test_resume_without_checkpoint_restarts_cleanly(reference, tmp_path, capsys):
    """Killed before its first checkpoint: config.yaml, logs of step 1 and the base evaluation,
    an empty checkpoints/. --resume restarts from step 0: no duplicate or mixed rows."""
    run_dir = _copy_run(reference, tmp_path)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    os.mkdir(os.path.join(run_dir, "checkpoints"))
    os.remove(os.path.join(run_dir, "summary.json"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "half a li')  # a torn last line
    assert _cli_train(run_dir, "--resume") == 0
    assert "restarting the run from step 0" in capsys.readouterr().err
    assert _logs(run_dir) == _logs(reference)
    assert _summary(run_dir) == _summary(reference)
    # the config is still checked against the saved one
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    assert _cli_train(run_dir, "--resume", overrides=SMALL + ["optim.learning_rate=0.5"]) == 2
    assert "config differs" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_with_nothing_to_resume_refuses(make, tmp_path, capsys):
    run_dir = tmp_path / "nothing"
    if make == "empty":
        run_dir.mkdir()
    assert _cli_train(run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert f"no run to resume in {run_dir}" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists() or not os.listdir(run_dir)  # nothing was started


def test_sweep_resumes_a_run_killed_before_its_checkpoints_dir(tmp_path):
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("{}\n")
    assert [a for _, _, a in cli.sweep_plan(["c/early.yaml"], str(tmp_path))] == ["resume"]


# --------------------------------------------------------------------------------------------
# 3: damaged checkpoints
# --------------------------------------------------------------------------------------------


def _largest_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
             if f != checkpoint.MANIFEST]
    return max(files, key=os.path.getsize)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _small_state(v):
    return {"w": jnp.full((1000,), float(v)), "b": jnp.arange(7.0) * v, "n": jnp.asarray(v)}


def test_checkpointer_detects_damage_and_sets_it_aside(tmp_path):
    d = str(tmp_path / "ckpt")
    c = Checkpointer(d, keep=3)
    for s in (1, 2, 3):
        c.save(s, _small_state(s), {"step": s})
    # manifests of earlier steps stay valid after later saves
    assert all(c.verify(s) is None for s in (1, 2, 3))
    _flip_byte(_largest_file(c.step_dir(3)))  # silent damage Orbax itself would not notice
    _truncate(_largest_file(c.step_dir(2)))
    like = _small_state(0)
    for s, what in ((3, "does not match its checksum"), (2, "bytes")):
        with pytest.raises(CheckpointError, match=f"step {s} .*is damaged.*{what}") as e:
            c.restore(like, s)
        assert e.value.step == s and e.value.damaged
    # a step without a manifest (killed between the commit and the manifest) loads
    os.remove(os.path.join(c.step_dir(1), checkpoint.MANIFEST))
    assert c.restore(like, 1)[2] == 1
    # without manifests, Orbax's own read still catches truncation
    os.remove(os.path.join(c.step_dir(2), checkpoint.MANIFEST))
    with pytest.raises(CheckpointError, match="step 2"):
        c.restore(like, 2)
    dest = c.set_aside(3)
    assert dest == os.path.join(d + ".damaged", "3") and os.path.isdir(dest)
    assert c.all_steps() == [1, 2] and c.latest_step() == 2
    state, record, step = c.restore(like, 1)
    assert step == 1 and record["step"] == 1 and float(state["w"][0]) == 1.0
    c.close()


def test_eval_and_export_name_the_damaged_step(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    _truncate(_largest_file(os.path.join(run_dir, "checkpoints", "3")))
    for args in (["eval", "--run", run_dir],
                 ["export", "--run", run_dir, "--peft", str(tmp_path / "peft")]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "checkpoint of step 3" in err and "damaged" in err and "--checkpoint" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main(["export", "--run", run_dir, "--peft", str(tmp_path / "peft"),
                     "--checkpoint", "2"]) == 0


def test_resume_falls_back_to_the_newest_intact_checkpoint(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    os.remove(os.path.join(run_dir, "summary.json"))
    _flip_byte(_largest_file(os.path.join(run_dir, "checkpoints", "3")))
    assert _cli_train(run_dir, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: the checkpoint of step 3" in err and "resumed from the checkpoint of step 2" in err
    aside = os.path.join(run_dir, "checkpoints.damaged", "3")
    assert os.path.isdir(aside)  # kept for inspection, not deleted
    assert _logs(run_dir) == _logs(reference)  # logs trimmed to step 2, step 3 rewritten once
    assert _summary(run_dir) == _summary(reference)
    _assert_states_equal(_final_state(run_dir)[1], _final_state(reference)[1])


def test_disk_full_while_writing_logs(reference, tmp_path, monkeypatch, capsys):
    """ENOSPC while appending to metrics.jsonl at step 3 (after the checkpoint of step 2): one
    line, exit code 5, no traceback; the checkpoint stays, and --resume after freeing space ends
    as the uninterrupted run (the torn line is dropped)."""
    run_dir = str(tmp_path / "run")
    original = runlog.RunLog.metrics

    def metrics(self, record):
        if record["step"] == 3:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write('{"step": 3, "rew')  # what a full disk leaves
            raise runlog.LogWriteError(os.path.join(self.run_dir, "metrics.jsonl"),
                                       OSError(errno.ENOSPC, "No space left on device"))
        return original(self, record)

    monkeypatch.setattr(runlog.RunLog, "metrics", metrics)
    assert _cli_train(run_dir) == cli.EXIT_SAVE_FAILED
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("arca-jax train: error: cannot write ")
    assert "metrics.jsonl (No space left on device)" in last and "--resume" in last
    assert _step_dirs(run_dir)[-1] == "2"
    monkeypatch.undo()
    assert _cli_train(run_dir, "--resume") == 0
    assert _logs(run_dir) == _logs(reference)


def test_log_write_errors_name_the_file(tmp_path):
    """A real OSError from the file system becomes a LogWriteError naming the file."""
    log = runlog.RunLog(str(tmp_path / "missing-dir"), stream=open(os.devnull, "w"),
                        tensorboard=False)
    with pytest.raises(runlog.LogWriteError, match="missing-dir/metrics.jsonl"):
        log.metrics({"step": 1, "loss": 0.0})


# --------------------------------------------------------------------------------------------
# 4: YAML errors in one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,where,expected", [
    ("grpo: [unclosed\n", "line 2, column 1", "expected ',' or ']'"),
    ("train:\n  steps: 3\n\tseed: 1\n", "line 3, column 1", "cannot start any token"),
    ("lora: {rank: 4\n", "line 2, column 1", "expected ',' or '}'"),
    ("a: b: c\n", "line 1, column 5", "mapping values are not allowed"),
    ('task: {name: "arith}\n', "line 2, column 1", "end of stream"),
])
def test_yaml_errors_are_one_line(text, where, expected, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert cli.main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and where in err and expected in err and "not valid YAML" in err


def test_damaged_config_yaml_of_a_run_is_one_line(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    with open(os.path.join(run_dir, "config.yaml"), "a") as f:
        f.write("train: [oops\n")
    assert _cli_train(run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config.yaml, line" in err


# --------------------------------------------------------------------------------------------
# 5: the persistent compilation cache
# --------------------------------------------------------------------------------------------


def test_compilation_cache_is_turned_off_for_several_processes(tmp_path):
    from jax._src import compilation_cache

    old_dir = jax.config.jax_compilation_cache_dir
    old_enabled = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
        assert setup.check_compilation_cache(1) is None  # one process: kept (tested below)
        assert jax.config.jax_enable_compilation_cache
        note = setup.check_compilation_cache(2, {setup.SHARED_CACHE_ENV: "1"})
        assert "keeping" in note and jax.config.jax_enable_compilation_cache
        note = setup.check_compilation_cache(2, {})
        assert "turned off" in note and setup.SHARED_CACHE_ENV in note
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_enable_compilation_cache", old_enabled)
        compilation_cache.reset_cache()


# --------------------------------------------------------------------------------------------
# A full disk during a save
# --------------------------------------------------------------------------------------------


def _fail_record_write_at(monkeypatch, fail_step):
    """Orbax's write of the checkpoint record raises ENOSPC (after writing half the file) in the
    save of `fail_step`: the state arrays of that step are written, its directory not committed."""
    import orbax.checkpoint as ocp

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    def save_fn(self, x, directory):
        if x.get("step") == fail_step:
            text = json.dumps(x)
            (directory / self._filename).write_text(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, x, directory)

    monkeypatch.setattr(handler, "_save_fn", save_fn)


def test_disk_full_during_a_save(reference, tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "ckpt")
    c = Checkpointer(d)
    c.save(1, _small_state(1), {"step": 1})
    _fail_record_write_at(monkeypatch, 2)
    with pytest.raises(CheckpointSaveError, match="No space left on device.*latest complete "
                                                  "checkpoint is step 1") as e:
        c.save(2, _small_state(2), {"step": 2})
    assert e.value.latest == 1
    assert os.listdir(d) == ["1"]  # no half-written step, no temporary directory
    assert c.latest_step() == 1 and c.restore(_small_state(0))[2] == 1
    c.close()

    # the training program: one line, exit code 5, the previous checkpoint stays loadable
    run_dir = str(tmp_path / "run")
    assert _cli_train(run_dir) == cli.EXIT_SAVE_FAILED
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("arca-jax train: error: cannot write the "
                                                      "checkpoint of step 2")
    assert "No space left on device" in last and "step 1" in last and "--resume" in last
    assert _step_dirs(run_dir) == ["1"]
    cfg, _, adapter, step = setup.load_run(run_dir)
    assert step == 1
    monkeypatch.undo()
    # space freed: --resume continues from step 1 and ends as the uninterrupted run
    assert _cli_train(run_dir, "--resume") == 0
    assert _logs(run_dir) == _logs(reference)


# --------------------------------------------------------------------------------------------
# Bad model output
# --------------------------------------------------------------------------------------------


class _Res:
    def __init__(self, rewards):
        self.rewards, self.timeouts = rewards, 0


class _NaNTask:
    def score_batch(self, completions, problems, timeout_s=None):
        values = [float("nan"), float("inf"), None, "x", -float("inf"), 1e300, 0.5, 1.0]
        return _Res([values[i % len(values)] for i in range(len(completions))])


def test_scorer_turns_invalid_rewards_into_zero():
    score = rollout_mod.Scorer(_NaNTask(), 1.0)
    got = score(["a"] * 8, [None] * 8)
    np.testing.assert_array_equal(got, np.asarray([0, 0, 0, 0, 0, 0, 0.5, 1.0], np.float32))
    assert score.invalid == 6 and score.new_invalid() == 6 and score.new_invalid() == 0


class _InvalidRewards:
    """The training task with a user's reward function that returns NaN for the first and inf
    for the last completion of every batch it scores."""

    def __init__(self, task):
        self._task, self.problems = task, task.problems

    def __getattr__(self, name):
        return getattr(self._task, name)

    def score_batch(self, completions, problems, **kw):
        rewards = list(np.asarray(self._task.score_batch(completions, problems, **kw).rewards,
                                  np.float64))
        rewards[0], rewards[-1] = float("nan"), float("inf")
        return _Res(rewards)


def _craft_rows(model, g):
    """Row 1 of a sampled batch made empty (EOS at once), row 2 made never-ending (every
    column a non-EOS token, no EOS: cut at max_new_tokens)."""
    out, N = g.out, g.out.tokens.shape[1]
    eos, other = model.eos_id, (model.eos_id + 1) % model.config.vocab_size
    if other == model.pad_id:
        other = (other + 1) % model.config.vocab_size
    empty = jnp.zeros((N,), out.mask.dtype).at[0].set(1)
    full = jnp.ones((N,), out.mask.dtype)

    def rows(x, r1, r2):
        return x.at[1].set(r1).at[2].set(r2)

    logps = rows(out.logps, jnp.where(empty > 0, -1.0, 0.0), jnp.full((N,), -1.0))
    out = out.replace(
        tokens=rows(out.tokens, jnp.full((N,), model.pad_id).at[0].set(eos), jnp.full((N,), other)),
        mask=rows(out.mask, empty, full), lengths=rows(out.lengths, 1, N),
        finished=rows(out.finished, True, False), logps=logps,
        sampled_logps=None if out.sampled_logps is None else rows(out.sampled_logps, logps[1],
                                                                  logps[2]))
    return g._replace(out=out)


def test_bad_model_output_has_defined_results(tmp_path, monkeypatch):
    """A reward function returning NaN / inf, an empty completion and a completion that never
    ends in every step: each step trains on finite numbers (invalid rewards count 0), the
    counts are logged, nothing is skipped, the adapter stays finite."""
    load_train_task, generate = setup.load_train_task, rollout_mod.generate_rows
    truncated = []

    def generate_rows(model, mesh, ids, mask, **gen):
        g = generate(model, mesh, ids, mask, **gen)
        g = _craft_rows(model, g)
        rows = ids.shape[0] * gen.get("group_size", 1)  # the prompts' completions (no padding)
        truncated.append(int((~np.asarray(g.out.finished)[:rows]).sum()))
        return g

    monkeypatch.setattr(setup, "load_train_task", lambda cfg: _InvalidRewards(load_train_task(cfg)))
    monkeypatch.setattr(rollout_mod, "generate_rows", generate_rows)
    run_dir = str(tmp_path / "bad")
    cfg = config.load(None, SMALL + ["rollout.eos_token=mask"])  # the empty row: 0 loss tokens
    assert not train.train(cfg, run_dir, stop_after=2)["finished"]
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    # running totals: the training rows (2 a step) and the base evaluation's scoring (the
    # evaluation scores with the same function: greedy and sampled passes, 2 each)
    assert [m["reward_invalid"] for m in metrics] == [6, 8]
    assert [m["completions_truncated"] for m in metrics] == truncated
    for m in metrics:
        assert m["completions_empty"] == 1 and m["completions_truncated"] >= 1
        assert all(v is not None for v in m.values()), m  # no NaN/inf (they log as null)
        assert m["skipped"] == 0 and m["advantage_invalid"] == 0
    assert all(s["reward"] is not None for s in read_jsonl(os.path.join(run_dir, "samples.jsonl")))
    step, state = _final_state(run_dir)
    assert step == 2
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(state.lora))


def test_non_finite_advantages_are_zeroed_and_a_nan_update_is_skipped(reference):
    """Finite rewards whose spread overflows float32 give non-finite advantages: set to 0 and
    counted. Should a NaN reach the loss anyway, the guarded update skips the step: the adapter
    and the optimiser are unchanged. (The run's own compiled step, on a batch of its shapes.)"""
    from arca_jax import sampling
    from arca_jax.grpo.objective import advantages

    big = np.asarray([[3e38, -3e38], [1.0, 0.0]], np.float32)
    adv, bad = rollout_mod.finite_advantages(advantages(big, "rloo"))
    assert bad == 2 and adv.tolist() == [0.0, 0.0, 1.0, -1.0]  # rollout() logs advantage_invalid

    cfg = config.load(None, SMALL)
    model = setup.load_model(cfg)
    opt = setup.build_optimizer(cfg)
    step = loop.make_train_step(model.config, setup.objective_config(cfg), opt,
                                lora_scale=cfg.lora.scaling, mode="jit", mesh=None,
                                microbatches=1, lora_dropout=cfg.lora.dropout)
    state = setup.init_state(cfg, model.config, opt)
    state = state.replace(lora=jax.tree_util.tree_map(lambda x: x + 0.01, state.lora))
    B, P, N = 4, 15, 48
    rng = np.random.default_rng(0)
    out = sampling.SampleOutput(
        tokens=jnp.asarray(rng.integers(3, 20, (B, N)), jnp.int32),
        mask=jnp.ones((B, N), jnp.int32), logps=jnp.full((B, N), -1.0, jnp.float32),
        lengths=jnp.full((B,), N, jnp.int32), finished=jnp.zeros((B,), bool),
        num_steps=jnp.asarray(N, jnp.int32), sampled_logps=jnp.full((B, N), -1.0, jnp.float32))
    batch = build_batch(jnp.asarray(rng.integers(3, 20, (B, P)), jnp.int32),
                                 jnp.ones((B, P), jnp.int32), out,
                                 advantages=np.asarray([np.nan, 1.0, -1.0, 0.0], np.float32))
    before = jax.tree_util.tree_map(np.asarray, (state.lora, state.opt_state))
    new_state, metrics = step(state, model.params, batch)
    assert int(metrics.skipped) == 1 and int(new_state.skipped_steps) == 1
    _assert_states_equal((new_state.lora, new_state.opt_state), before)


# --------------------------------------------------------------------------------------------
# SIGKILL at seeded random moments
# --------------------------------------------------------------------------------------------

# phases in the order a step goes through them (evaluations come after the step's samples)
_ORDER = {"sampling": 0, "scoring": 1, "update": 2, "samples": 3, "eval": 4, "save": 5,
          "saved": 6}


def _fault_plan(seed: int, steps: int, eval_steps):
    """Three kills, in run order: one during an evaluation, one during sampling or scoring, one
    during a checkpoint save (from its start, or between Orbax's commit and the manifest)."""
    rng = random.Random(seed)
    kills = [("eval", rng.choice(list(eval_steps)), round(rng.uniform(0.0, 0.5), 2)),
             (rng.choice(["sampling", "scoring"]), rng.randint(1, steps),
              round(rng.uniform(0.0, 0.3), 2)),
             (rng.choice(["save", "saved"]), rng.randint(1, steps),
              round(rng.uniform(0.0, 0.05), 3))]
    if kills[-1][0] == "saved":  # exactly between Orbax's commit and the checksum manifest
        kills[-1] = ("saved", kills[-1][1], 0.0)
    return sorted(kills, key=lambda k: (k[1], _ORDER[k[0]] if k[1] else -1))


def test_fault_plan_is_seeded_and_ordered():
    plan = _fault_plan(21, 3, (0, 2, 3))
    assert plan == _fault_plan(21, 3, (0, 2, 3)) and len(plan) == 3
    assert plan[0][:2] == ("eval", 0) and plan[1][:2] == ("save", 2)
    assert {k[0] for k in plan} & {"eval"} and {k[0] for k in plan} & {"save", "saved"}
    assert faults._parse("eval@0+0.2,save@3") == {("eval", 0): 0.2, ("save", 3): 0.0}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(reference, xla_cache,
                                                                      tmp_path):
    """The CLI in a subprocess, SIGKILLed three times (seeded: during an evaluation, sampling or
    scoring, and a checkpoint save), resumed after each: metrics, evaluations, samples, summary
    and the final train state (LoRA and optimiser) equal the uninterrupted run, and no step is
    repeated or missing in any log. The subprocesses share a persistent compilation cache (the
    supported single-process setup)."""
    run_dir = tmp_path / "killed"
    entries = set(os.listdir(xla_cache))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=xla_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_DEFAULT_MATMUL_PRECISION="highest",  # as tests/conftest.py sets in-process
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "arca_jax", "train", "--output-dir", str(run_dir)]
    for o in SMALL:
        cmd += ["--set", o]
    # seed 21: during the base evaluation (before any checkpoint), 0.04 s into the save of
    # step 2, during the scoring of step 3; ARCA_JAX_FAULT_SEED draws other moments
    plan = _fault_plan(int(os.environ.get("ARCA_JAX_FAULT_SEED", "21")), 3, (0, 2, 3))
    codes = []
    for i, (point, step, delay) in enumerate(plan + [(None, None, None)]):
        e = dict(env)
        if point is not None:
            e[faults.ENV] = f"{point}@{step}+{delay}"
        proc = subprocess.run(cmd + (["--resume"] if i else []), env=e, capture_output=True,
                              text=True, timeout=600)
        codes.append(proc.returncode)
        assert proc.returncode in (0, -signal.SIGKILL), (plan, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert codes == [-signal.SIGKILL] * 3 + [0], (plan, codes)
    assert _logs(str(run_dir)) == _logs(reference), plan
    assert _summary(str(run_dir)) == _summary(reference)
    step, state = _final_state(str(run_dir))
    ref_step, ref_state = _final_state(reference)
    assert step == ref_step == 3
    _assert_states_equal(state, ref_state)
    assert not os.path.exists(str(run_dir) + "/checkpoints.damaged")
    assert entries  # the reference run filled the cache the subprocesses read
