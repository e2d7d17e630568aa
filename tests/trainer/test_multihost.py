"""Multi-process training on one machine: JAX's distributed runtime on a loopback coordinator, two
CPU processes with two devices each, against one process with four devices (issue 9).

The runs are subprocesses (`python -m arca_jax train ...` and, for `stop_after`, a small driver
calling the library); the one-process runs share a persistent compilation cache (see `_env`).
Compared: every metric of every step, the evaluations, the logged samples, and the final LoRA
parameters (within 1e-5); the two-process run's checkpoint resumes in one process. A train state
split over fsdp across both processes is saved and restored onto other meshes, in two processes
and in one, and a state saved by one process is restored across two, shard for shard. Failures:
a signal on one process stops both at the same step, a killed process ends the other with an
error in bounded time and leaves a loadable checkpoint, an unreachable coordinator ends with a
clear message.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from arca_jax import cli, distributed, trainer
from fixtures import TIMING, read_jsonl

TINY = ["train.steps=2", "train.mode=mesh", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=48", "task.num_eval_problems=4", "task.max_train_samples=64",
        "train.eval_batch_size=2", "train.save_every=1", "train.samples_every=2",
        "train.samples_per_log=1", "grpo.weighting=arca", "grpo.sharpening=2.0",
        "optim.learning_rate=1e-2", "optim.warmup_steps=0",
        "train.seed=2"]  # seed 2: the first step has mixed rewards on the re-pretrained model
RUN_TIMEOUT = 300
HEARTBEAT_S = 5  # the killed-process test: how fast a dead peer ends the survivor
HEARTBEAT_OK_S = 120  # runs that must finish: a loaded CI machine has stalled both for 30 s
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "WORLD_SIZE",
            "RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
            "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "JAX_LOCAL_DEVICE_IDS")

# A train state with known values (every float leaf distinct, Adam's moments non-zero), the same
# in every process: the tiny model's adapter at rank 4 and its AdamW state.
KNOWN_STATE = textwrap.dedent("""
    import jax, numpy as np
    from arca_jax import lora, parallel, qwen3
    from arca_jax.grpo import TrainState, make_optimizer

    CONFIG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8)

    def known_state():
        tree = lora.init_lora(CONFIG, lora.LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(1))
        state = TrainState.create(tree, make_optimizer(1e-3), jax.random.PRNGKey(2))
        leaves, treedef = jax.tree_util.tree_flatten(state)
        leaves = [np.asarray(x) if np.ndim(x) < 3 else
                  (np.arange(np.size(x)).reshape(np.shape(x)) * 1e-3 + i).astype(np.float32)
                  for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def placed(state, mesh):
        # the global arrays laid out as the mesh step holds them (`parallel.state_shardings`)
        shardings = parallel.state_shardings(state, mesh, CONFIG.num_key_value_heads)
        return jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
            state, shardings)

    def check(got, want, like):
        # each addressable shard holds exactly the known values, in the target's layout
        for g, w, t in zip(*(jax.tree_util.tree_leaves(x) for x in (got, want, like))):
            assert g.sharding.is_equivalent_to(t.sharding, g.ndim), (g.sharding, t.sharding)
            for shard in g.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(w)[shard.index])
""")

# Two processes: save the known state split over fsdp 4 (both processes' devices: each process
# owns half of every factor and moment), then restore it onto (data 2, fsdp 2); and restore the
# same state saved by one process (fsdp 8 over its eight devices) onto that layout.
CKPT_DRIVER = KNOWN_STATE + textwrap.dedent("""
    import json, sys
    from arca_jax import distributed
    from arca_jax.checkpoint import Checkpointer
    a = json.loads(sys.argv[1])
    distributed.initialize(distributed.Settings(**a["dist"]))
    known = known_state()
    state = placed(known, parallel.make_mesh(1, 4, 1))
    mu = state.opt_state[1].inner_state[0].mu["layers"]["mlp"]["up_proj"]["lora_b"]  # [2, 4, 48]
    assert not mu.is_fully_addressable and mu.addressable_shards[0].data.shape == (2, 4, 12)
    ckpt = Checkpointer(a["directory"])
    ckpt.save(1, state, {"step": 1})
    like = placed(jax.tree_util.tree_map(np.zeros_like, known), parallel.make_mesh(2, 2, 1))
    got, record, step = ckpt.restore(like)
    assert (record["step"], step) == (1, 1)
    check(got, known, like)
    ckpt.close()
    one = Checkpointer(a["saved_by_one_process"])  # fsdp 8 in one process -> across two
    got, record, step = one.restore(like)
    assert (record["step"], step) == (3, 3)
    check(got, known, like)
    one.close()
    print("restored on (data 2, fsdp 2)", flush=True)
""")

DRIVER = textwrap.dedent("""
    import json, sys
    from arca_jax import config, distributed, train
    a = json.loads(sys.argv[1])
    distributed.initialize(distributed.Settings(**a["dist"]))
    train.train(config.load(None, a["overrides"]), a["run_dir"], resume=a["resume"],
                stop_after=a["stop_after"])
""")


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _env(devices: int, cache=None) -> dict:
    """A subprocess environment: CPU, `devices` forced host devices, and (one-process runs only)
    the persistent compilation cache. On CPU the cache key holds a per-process topology
    fingerprint, so only process 0 of a multi-process run would read entries (written by an
    earlier run's process 0) while process 1 compiles afresh; once that pairing executed
    mismatched collectives (gloo: "Received data size doesn't match expected size"), so
    multi-process runs compile everything themselves."""
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_ENV and not k.startswith("JAX_COMPILATION_CACHE")}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()  # conftest's, device count
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(run_dir, overrides, extra=()):
    cmd = [sys.executable, "-m", "arca_jax", "train", "--output-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + list(extra)


def _single(run_dir, cache, overrides=TINY, extra=()):
    """One process, four devices (the CLI)."""
    proc = subprocess.run(_train_cmd(run_dir, overrides, extra), env=_env(4, cache),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _spawn_two(cmds, log_dir):
    """Two processes with two devices each; stdout+stderr to files (pipes could fill up)."""
    procs = []
    for i, cmd in enumerate(cmds):
        out = open(os.path.join(log_dir, f"p{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, env=_env(2), stdout=out,
                                       stderr=subprocess.STDOUT), out))
    return procs


def _wait_all(procs, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p, out in procs:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
            out.close()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def _logs(log_dir):
    return "\n".join(open(os.path.join(log_dir, f"p{i}.log")).read()[-4000:] for i in range(2))


def _dist_flags(port, i, heartbeat=HEARTBEAT_OK_S):
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(i), "--init-timeout", "120", "--heartbeat-timeout", str(heartbeat)]


def _two_cli(run_dir, log_dir, overrides=TINY, extra=(), heartbeat=HEARTBEAT_OK_S):
    port = _free_port()
    return _spawn_two([_train_cmd(run_dir, overrides, list(extra) + _dist_flags(port, i, heartbeat))
                       for i in range(2)], log_dir)


def _two_driver(run_dir, log_dir, stop_after=None, resume=False):
    port = _free_port()
    cmds = []
    for i in range(2):
        arg = {"dist": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                        "process_id": i, "initialization_timeout": 120,
                        "heartbeat_timeout": HEARTBEAT_OK_S},
               "overrides": TINY, "run_dir": str(run_dir), "resume": resume,
               "stop_after": stop_after}
        cmds.append([sys.executable, "-c", DRIVER, json.dumps(arg)])
    return _spawn_two(cmds, log_dir)


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


def _rows(run_dir, name):
    return read_jsonl(os.path.join(run_dir, name))


def _assert_rows_close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            if k in TIMING:
                continue
            if isinstance(w[k], float) and isinstance(g[k], float):
                assert abs(g[k] - w[k]) <= tol * max(1.0, abs(w[k])), (w.get("step"), k, g[k], w[k])
            elif isinstance(w[k], dict):  # samples: token weights per method
                for m in w[k]:
                    np.testing.assert_allclose(g[k][m], w[k][m], atol=tol, rtol=0)
            else:
                assert g[k] == w[k], (w.get("step"), k, g[k], w[k])


def _lora(run_dir, step):
    _, _, adapter, got = trainer.load_run(str(run_dir), step)
    assert got == step
    return adapter


def _assert_lora_close(a, b, tol=1e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, cache_dir):
    """The reference: one process, four devices, two steps (checkpoints 1 and 2)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    _single(run_dir, cache_dir)
    return run_dir


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_cpu_cross_process_collectives_are_available():
    """jax's CPU client does cross-process collectives through gloo (the default here)."""
    assert jax.config.jax_cpu_collectives_implementation in ("gloo", "mpi")


@pytest.mark.slow
def test_two_processes_equal_one_process_and_checkpoints_cross(single_run, tmp_path, cache_dir):
    ref_metrics = _rows(single_run, "metrics.jsonl")
    ref_evals = _rows(single_run, "eval.jsonl")
    assert [m["step"] for m in ref_metrics] == [1, 2] and [e["step"] for e in ref_evals] == [0, 2]
    assert any(m["reward_mean"] > 0 for m in ref_metrics)
    assert ref_metrics[0]["learning_rate"] > 0 and ref_metrics[-1]["residual_norm_mean"] > 0

    # 1) two processes (the library: distributed.initialize + train.train), stopped after step 1
    multi = tmp_path / "multi"
    logs = tmp_path / "logs_multi"
    logs.mkdir()
    assert _wait_all(_two_driver(multi, str(logs), stop_after=1)) == [0, 0], _logs(logs)
    assert sorted(os.listdir(multi / "checkpoints")) == ["1"]
    _assert_rows_close(_rows(multi, "metrics.jsonl"), ref_metrics[:1])
    assert _rows(multi, "eval.jsonl") == ref_evals[:1]
    step1 = _lora(single_run, 1)
    _assert_lora_close(_lora(multi, 1), step1)

    # 2) its checkpoint resumes in one process: the finished run equals the reference
    _single(multi, cache_dir, extra=["--resume"])
    _assert_rows_close(_rows(multi, "metrics.jsonl"), ref_metrics)
    _assert_rows_close(_rows(multi, "samples.jsonl"), _rows(single_run, "samples.jsonl"))
    assert _rows(multi, "eval.jsonl") == ref_evals
    step2 = _lora(single_run, 2)
    assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(
        jax.tree_util.tree_leaves(step1), jax.tree_util.tree_leaves(step2))) > 1e-3  # it learned
    _assert_lora_close(_lora(multi, 2), step2)


@pytest.mark.slow
def test_split_state_checkpoint_crosses_processes_and_meshes(tmp_path):
    """The train state split over fsdp 4 across two processes (each owns half of every factor and
    Adam moment) is saved by both and restored onto (data 2, fsdp 2) across them, then in one
    process onto fsdp 8 and onto one device; a state saved by one process (fsdp 8) is restored
    across the two: every shard exactly as saved."""
    from arca_jax.checkpoint import Checkpointer

    space = {}
    exec(KNOWN_STATE, space)
    known = space["known_state"]()
    one = Checkpointer(str(tmp_path / "one"))
    one.save(3, space["placed"](known, space["parallel"].make_mesh(1, 8, 1)), {"step": 3})
    one.close()
    directory, logs = str(tmp_path / "ckpt"), tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    cmds = [[sys.executable, "-c", CKPT_DRIVER, json.dumps({
        "dist": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                 "process_id": i, "initialization_timeout": 120,
                 "heartbeat_timeout": HEARTBEAT_OK_S},
        "directory": directory, "saved_by_one_process": str(tmp_path / "one")})] for i in range(2)]
    assert _wait_all(_spawn_two(cmds, str(logs))) == [0, 0], _logs(logs)
    assert "restored on (data 2, fsdp 2)" in _logs(logs)
    ckpt = Checkpointer(directory)
    try:
        for like in (space["placed"](known, space["parallel"].make_mesh(1, 8, 1)),
                     jax.device_put(known, jax.devices()[0])):
            got, _, step = ckpt.restore(like)
            assert step == 1
            space["check"](got, known, like)
    finally:
        ckpt.close()


# DAPO's rollout settings: dynamic sampling decides from the all-gathered rewards, so both
# processes run the same extra rounds and assemble the same batch (seed 3: step 1 resamples)
DAPO = TINY[:-1] + ["train.seed=3", "train.steps=1", "train.samples_every=1",
                    "rollout.dynamic_sampling=true", "rollout.max_resample_rounds=3",
                    "rollout.overlong_buffer=16", "rollout.overlong_filtering=true",
                    "grpo.loss_aggregation=token_mean", "grpo.clip_eps_high=0.28"]


@pytest.mark.slow
def test_dapo_rollout_two_processes_equal_one_process(tmp_path, cache_dir):
    single = tmp_path / "single"
    _single(single, cache_dir, overrides=DAPO)
    ref = _rows(single, "metrics.jsonl")
    assert ref[0]["resample_rounds"] > 0 and ref[0]["groups_dropped"] > 0, ref
    multi, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    assert _wait_all(_two_cli(multi, str(logs), overrides=DAPO)) == [0, 0], _logs(logs)
    _assert_rows_close(_rows(multi, "metrics.jsonl"), ref)
    _assert_rows_close(_rows(multi, "samples.jsonl"), _rows(single, "samples.jsonl"))
    _assert_lora_close(_lora(multi, 1), _lora(single, 1))


# the sampler's weights gathered over fsdp 4 (two devices in each process) for every rollout and
# evaluation, as `rollout.gather_weights` does on accelerators where they fit
GATHERED = TINY[:-1] + ["train.seed=2", "train.steps=1", "train.mesh_fsdp=4",
                        "rollout.gather_weights=true"]


# the update on fsdp 4 (two devices in each process), rollouts and evaluation on the same devices
# as one tensor group of 4 across both processes (`rollout.mesh_tensor`): every process holds
# every row while sampling, and the completions go back to the train step's rows
ROLLOUT_MESH = TINY[:-1] + ["train.seed=2", "train.steps=1", "train.mesh_fsdp=4",
                            "rollout.mesh_tensor=4"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [GATHERED, ROLLOUT_MESH], ids=["gathered", "rollout_mesh"])
def test_sampler_layouts_two_processes_equal_one_process(tmp_path, cache_dir, overrides):
    single = tmp_path / "single"
    _single(single, cache_dir, overrides=overrides)
    ref = _rows(single, "metrics.jsonl")
    multi, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    assert _wait_all(_two_cli(multi, str(logs), overrides=overrides)) == [0, 0], _logs(logs)
    _assert_rows_close(_rows(multi, "metrics.jsonl"), ref)
    assert _rows(multi, "eval.jsonl") == _rows(single, "eval.jsonl")
    _assert_lora_close(_lora(multi, 1), _lora(single, 1))


def _wait_for_line(log_dir, text, procs, timeout=240):
    """Until process 0's log holds `text` (both processes still running)."""
    path = os.path.join(log_dir, "p0.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in open(path).read():
            return
        assert all(p.poll() is None for p, _ in procs), _logs(log_dir)
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {timeout} s:\n{_logs(log_dir)}")


@pytest.mark.slow
def test_signal_on_one_process_stops_both_and_a_killed_process_ends_the_other(tmp_path):
    run_dir = tmp_path / "run"

    # SIGTERM to process 1 alone while step 1 runs: both stop after it, save it, exit 3
    logs = str(tmp_path / "logs_term")
    os.mkdir(logs)
    procs = _two_cli(run_dir, logs)
    _wait_for_line(logs, "eval step 0", procs)  # process 1 has passed it too (an all-gather)
    procs[1][0].send_signal(signal.SIGTERM)
    assert _wait_all(procs) == [3, 3], _logs(logs)
    assert "stopped at step 1 (a signal on another process)" in _logs(logs)
    assert len(_rows(run_dir, "metrics.jsonl")) == 1

    # resume in two processes and SIGKILL process 1 during step 2: process 0 ends with an error
    # within the heartbeat timeout (plus slack) instead of hanging; checkpoint 1 still loads
    logs = str(tmp_path / "logs_kill")
    os.mkdir(logs)
    procs = _two_cli(run_dir, logs, extra=["--resume"], heartbeat=HEARTBEAT_S)
    _wait_for_line(logs, "resumed from the checkpoint of step 1", procs)
    procs[1][0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = procs[0][0].wait(timeout=HEARTBEAT_S + 60)
    finally:
        _wait_all(procs, timeout=5)
    elapsed = time.monotonic() - t0
    text = _logs(logs)
    assert code not in (0, 3), text
    assert elapsed < HEARTBEAT_S + 25, elapsed
    assert "Gloo" in text or "detected fatal errors" in text or "unhealthy" in text, text
    assert len(_rows(run_dir, "metrics.jsonl")) == 1
    _, _, adapter, step = trainer.load_run(str(run_dir), None)  # the last complete checkpoint
    assert step == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(adapter))


def test_unreachable_coordinator_ends_with_a_clear_message(tmp_path):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "arca_jax", "train", "--output-dir", str(tmp_path / "r"),
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
         "--init-timeout", "3"], env=_env(2), capture_output=True,
        text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach the coordinator at 127.0.0.1:{port} within 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60


def test_watchdog_ends_a_stuck_process():
    code = ("import time\nfrom arca_jax.distributed import Watchdog\n"
            "with Watchdog(1.0) as w:\n    w.beat('phase one')\n    time.sleep(30)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=_env(1))
    assert proc.returncode == distributed.EXIT_WATCHDOG
    assert "no training progress" in proc.stderr and "phase one" in proc.stderr
    assert time.monotonic() - t0 < 25


# --------------------------------------------------------------------------------------------
# Settings resolution (no processes)
# --------------------------------------------------------------------------------------------


def _plan(env, tpu_processes=0, **kw):
    return distributed.resolve(distributed.Settings(**kw), env, tpu_processes=tpu_processes)


def test_resolve_settings_from_flags_and_environment():
    assert _plan({}).source == "none"
    assert _plan({}, tpu_processes=4).source == "tpu"  # a pod slice of 4 hosts
    assert _plan({}, tpu_processes=1).source == "none"  # one TPU VM: nothing to join
    assert _plan({}, tpu_processes=1, mode="on").source == "tpu"
    assert _plan({}, tpu_processes=4, mode="off").source == "none"
    assert distributed.resolve(distributed.Settings(), {}).source == "none"  # this machine
    p = _plan({}, coordinator_address="h:1234", num_processes=4, process_id=3)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("explicit", "h:1234", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:9000", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    p = _plan(env)
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("env", "10.0.0.1:9000", 2, 1)
    p = _plan(env, process_id=0)  # a flag wins over the environment
    assert (p.source, p.process_id) == ("explicit", 0)
    p = _plan({"MASTER_ADDR": "n0", "MASTER_PORT": "29400", "WORLD_SIZE": "8", "RANK": "5"})
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("torchrun", "n0:29400", 8, 5)
    assert _plan({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "n0"}).source == "none"
    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[0-3]", "SLURM_PROCID": "3",
            "SLURM_LOCALID": "0"}
    assert _plan({"SLURM_NTASKS": "16", **srun}).source == "slurm"
    assert _plan({"SLURM_NTASKS": "1", **srun}).source == "none"
    assert _plan({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}).source == "none"  # salloc shell
    assert _plan({"OMPI_COMM_WORLD_SIZE": "4"}).source == "ompi"
    assert _plan({}, coordinator_address="h:1", num_processes=1, process_id=0).source == "none"


@pytest.mark.parametrize("kw,env,message", [
    ({"num_processes": 2}, {}, "--coordinator-address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process id"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer"),
    ({"mode": "on"}, {}, "no coordinator address"),
    ({"mode": "sometimes"}, {}, "distributed mode"),
])
def test_resolve_rejects_incomplete_settings(kw, env, message):
    with pytest.raises(distributed.DistributedError, match=message):
        _plan(env, **kw)


def test_cli_reports_bad_distributed_flags_in_one_line(tmp_path, capsys):
    assert cli.main(["train", "--output-dir", str(tmp_path / "r"), "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator-address" in err and "Traceback" not in err


def test_split_address():
    assert distributed.split_address("10.1.2.3:8476") == ("10.1.2.3", 8476)
    assert distributed.split_address("[fe80::1]:99") == ("fe80::1", 99)
