"""The training program end to end on the embedded tiny model: outputs, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import yaml

from arca_jax import cli, config, train, trainer
from fixtures import TIMING, read_jsonl

TINY = ["train.steps=4", "rollout.prompts_per_step=2", "rollout.group_size=3",
        "rollout.max_new_tokens=72", "task.num_eval_problems=4", "task.max_train_samples=64",
        "train.save_every=2", "train.samples_every=2", "train.samples_per_log=1",
        "grpo.weighting=arca", "grpo.sharpening=2.0", "optim.learning_rate=1e-2"]


def _rows(run_dir, name):
    return read_jsonl(os.path.join(run_dir, name))


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "full")
    summary = train.train(config.load(None, TINY), run_dir)
    return run_dir, summary


def test_run_directory_has_every_output(full_run):
    run_dir, summary = full_run
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "tb"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
    metrics = _rows(run_dir, "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "loss", "grad_norm", "learning_rate", "weight_gini",
                "effective_token_ratio", "residual_norm_mean", "residual_norm_max", "kl",
                "completion_length", "time_sample_s", "time_score_s", "time_update_s",
                "tokens_per_s", "sample_tokens_per_s", "slot_utilisation"):
        assert key in metrics[-1], key
    for m in metrics:  # tokens / (rows x columns run): at least mean length / budget, at most 1
        assert m["completion_length"] / 72 - 1e-6 <= m["slot_utilisation"] <= 1.0
        # the packed update: its slots hold every completion token (2 x 3 rows) and some prompt
        assert 0.0 < m["update_fill"] <= 1.0 and m["update_slots"] > 0
        assert m["update_fill"] * m["update_slots"] > m["completion_length"] * 6
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert 0.0 < metrics[-1]["weight_gini"] < 1.0
    assert any(m["reward_mean"] > 0 for m in metrics)  # the shipped model solves some problems
    assert metrics[0]["residual_norm_mean"] < 1e-4  # B = 0 at the first step: no residual yet
    assert metrics[-1]["residual_norm_mean"] > 0.0
    evals = _rows(run_dir, "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4] and evals[0]["k"] == 3
    samples = _rows(run_dir, "samples.jsonl")
    assert {s["step"] for s in samples} == {2, 4}
    for s in samples:
        assert set(s["weights"]) == {"uniform", "surprisal", "entropy_reduction", "divergence", "arca"}
        for w in s["weights"].values():
            assert len(w) == len(s["tokens"]) and abs(sum(w) - 1.0) < 1e-4
    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert cfg["grpo"]["weighting"] == "arca" and cfg["train"]["steps"] == 4
    assert summary["finished"] and summary["steps"] == 4
    assert summary["base_greedy_accuracy"] == evals[0]["greedy_accuracy"]
    # rank 8 x 3 layers x (in + out) summed over q, o (128+128), k, v (128+64), gate, up, down (128+384)
    assert summary["trainable_params"] == 8 * 3 * (2 * 256 + 2 * 192 + 3 * 512)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    run_dir, _ = full_run
    resumed = str(tmp_path / "resumed")
    # the packed step's programs prepared ahead in the background (off on CPU by default):
    # the same records as the uninterrupted run, which compiled each program when met
    cfg = config.load(None, TINY + ["train.prepare_ahead=true"])
    first = train.train(cfg, resumed, stop_after=2)
    assert not first["finished"]
    with pytest.raises(train.RunDirError, match="--resume"):
        train.train(cfg, resumed)  # never overwrite a run
    train.train(cfg, resumed, resume=True)
    assert _strip_timing(_rows(resumed, "metrics.jsonl")) == _strip_timing(_rows(run_dir, "metrics.jsonl"))
    assert _rows(resumed, "eval.jsonl") == _rows(run_dir, "eval.jsonl")


def test_eval_and_export_commands(full_run, tmp_path, capsys):
    run_dir, summary = full_run
    assert cli.main(["eval", "--run", run_dir]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == 4 and out["greedy_accuracy"] == summary["final_greedy_accuracy"]
    assert cli.main(["export", "--run", run_dir, "--peft", str(tmp_path / "peft")]) == 0
    from arca_jax import hf, lora
    cfg_model, _ = hf.load_pretrained(config.ModelConfig().resolved_path())
    lcfg, tree = lora.load_peft(tmp_path / "peft", cfg_model)
    assert lcfg.rank == 8 and lora.count_params(tree) == summary["trainable_params"]


@pytest.mark.parametrize("args,message", [
    (["--config", "/does/not/exist.yaml"], "does not exist"),
    (["--set", "lora.rnk=3"], "unknown key lora.rnk"),
    (["--set", "train.steps=many"], "expected an integer"),
    (["--set", "lora.rank=0"], "rank"),
    (["--set", "rollout.group_size=1"], "group_size must be >= 2"),
    (["--set", "rollout.group_size=1", "--set", "grpo.estimator=grpo_batch_std"],
     "group_size must be >= 2"),
    (["--set", "rollout.min_p=1.5"], "min_p must be in [0, 1]"),
    (["--set", "grpo.clip_ratio_max=1.1"], "clip_ratio_max must be > 1 + clip_eps_high"),
    (["--set", "grpo.policy_loss=ppo"], "policy_loss 'ppo'"),
    (["--set", "grpo.top_entropy_quantile=0"], "top_entropy_quantile must be in (0, 1]"),
    (["--set", "rollout.temperature=0"], "temperature"),
    (["--set", "rollout.shrink=-1"], "shrink must be >= 0"),
    (["--set", "rollout.replicas=999"], "rollout.replicas=999: this process has"),
    (["--set", "model.path=/no/such/model"], "model.path"),
    (["--set", "task.path=/no/such/data.jsonl"], "task.path"),
    (["--set", "train.mode=pmap", "--set", "rollout.prompts_per_step=3",
      "--set", "rollout.group_size=2"], "divisible by the device count"),
])
def test_bad_input_exits_2_without_traceback(args, message, tmp_path, capsys):
    code = cli.main(["train", "--output-dir", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unparsable_config_and_existing_run_dir(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [unclosed\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    assert cli.main(["train", "--output-dir", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (existing / "metrics.jsonl").read_text() == "{}\n"  # untouched
    orphan = tmp_path / "orphan"
    (orphan / "checkpoints" / "3").mkdir(parents=True)  # checkpoints of an unknown config
    assert cli.main(["train", "--output-dir", str(orphan), "--resume"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_cli_as_a_subprocess_reports_bad_input_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "arca_jax", "train", "--set", "grpo.weighting=bogus",
                           "--output-dir", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "weighting" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_plan(tmp_path):
    root = tmp_path / "runs"
    (root / "done").mkdir(parents=True)
    (root / "done" / "summary.json").write_text('{"finished": true}')
    (root / "half" / "checkpoints").mkdir(parents=True)
    plan = cli.sweep_plan(["a/done.yaml", "b/half.yaml", "c/new.yaml"], str(root))
    assert [a for _, _, a in plan] == ["skip", "resume", "start"]
    assert plan[1][1] == os.path.join(str(root), "half")


KILL_SCRIPT = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from arca_jax.checkpoint import Checkpointer
    c = Checkpointer(sys.argv[1], keep=2)
    step = 0
    while True:
        step += 1
        c.save(step, {"w": jnp.full((4_000_000,), float(step)), "step": jnp.asarray(step)},
               {"step": step})
        print(step, flush=True)
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    from arca_jax.checkpoint import Checkpointer
    import jax.numpy as jnp

    d = str(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, d], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete, then kill during the next one
            assert proc.stdout.readline()
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    c = Checkpointer(d, keep=2)
    step = c.latest_step()
    assert step is not None and step >= 3
    state, record, got = c.restore({"w": jnp.zeros((4_000_000,)), "step": jnp.asarray(0)})
    assert got == step == record["step"] == int(state["step"])
    assert float(state["w"].min()) == float(state["w"].max()) == float(step)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "arca_jax", "train", "--output-dir", str(run_dir)]
    for item in TINY + ["train.steps=50", "train.save_every=0"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err
    assert "continue with --resume" in err
    steps = [int(s) for s in os.listdir(run_dir / "checkpoints")]
    assert steps and max(steps) == len(_rows(str(run_dir), "metrics.jsonl")) < 50


@pytest.mark.slow
def test_pmap_mode_trains(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("train.steps", "rollout.prompts_per_step",
                                                       "rollout.group_size"))]
    cfg = config.load(None, overrides + ["train.mode=pmap", "train.steps=2",
                                         "rollout.prompts_per_step=4", "rollout.group_size=2"])
    summary = train.train(cfg, str(tmp_path / "pmap"))
    metrics = _rows(str(tmp_path / "pmap"), "metrics.jsonl")
    assert summary["finished"] and len(metrics) == 2
    assert all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in metrics)


@pytest.mark.slow
def test_refilling_rollouts_and_evaluation_log_the_same_run(tmp_path):
    """rollout.max_batch (one group of 3 rows decoding at a time, the other group waiting for
    its slots) and train.eval_batch_size=1 (one problem's rows at a time, the others refilled),
    and rollout.shrink (slots halved as rows end, in rollouts and evaluation) sample the same
    completions as one batch: identical rewards, lengths and evaluations, and the same losses;
    only the slot accounting differs."""
    overrides = [o for o in TINY if not o.startswith(("train.steps", "train.save_every",
                                                       "train.samples_every"))]
    overrides += ["train.steps=2", "train.save_every=0", "train.samples_every=0"]
    runs = {}
    for name, extra in (("one_batch", []),
                        ("refill", ["rollout.max_batch=3", "train.eval_batch_size=1"]),
                        ("shrink", ["rollout.shrink=2"])):
        run_dir = str(tmp_path / name)
        assert train.train(config.load(None, overrides + extra), run_dir)["finished"]
        runs[name] = (_rows(run_dir, "metrics.jsonl"), _rows(run_dir, "eval.jsonl"))
    m1, e1 = runs["one_batch"]
    for m2, e2 in (runs["refill"], runs["shrink"]):
        assert len(m1) == len(m2) == 2
        for a, b in zip(m1, m2):
            for key in ("reward_mean", "reward_std", "completion_length"):
                assert a[key] == b[key], key
            for key in ("loss", "grad_norm", "weight_gini", "effective_token_ratio"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
            assert 0 < a["slot_utilisation"] <= 1 and 0 < b["slot_utilisation"] <= 1
        assert _strip_timing(e1) == _strip_timing(e2)
    for a, b in zip(m1, runs["shrink"][0]):  # fewer idle slot-steps
        assert b["slot_utilisation"] >= a["slot_utilisation"]


def _mesh_run(steps: int, save_every: int) -> list:
    """TINY as a train.mode=mesh run of 4 prompts x 2 completions (8 rows: one per device)."""
    keep = [o for o in TINY if not o.startswith(("train.steps", "rollout.prompts_per_step",
                                                  "rollout.group_size", "train.save_every",
                                                  "train.samples_every"))]
    return keep + ["train.mode=mesh", f"train.steps={steps}", "rollout.prompts_per_step=4",
                   "rollout.group_size=2", f"train.save_every={save_every}",
                   "train.samples_every=0"]


def test_rollouts_on_a_mesh_of_their_own_log_the_same_run(tmp_path, capsys):
    """train.mode=mesh, the update on fsdp 8, and rollouts and evaluation on the same 8 devices
    laid out as data 2 x tensor 4 (rollout.mesh_tensor=4): the same sampled tokens as sampling on
    the train mesh, hence rewards, lengths and evaluations, and losses and weight statistics to
    float rounding. A rollout mesh the devices or the model cannot take is refused before
    anything runs."""
    overrides = _mesh_run(steps=1, save_every=0) + ["train.mesh_fsdp=8"]
    runs = {}
    for name, extra in (("train_mesh", []), ("rollout_mesh", ["rollout.mesh_tensor=4"])):
        run_dir = str(tmp_path / name)
        assert train.train(config.load(None, overrides + extra), run_dir)["finished"]
        runs[name] = (_rows(run_dir, "metrics.jsonl"), _rows(run_dir, "eval.jsonl"))
    assert "sample on the mesh data 2 x fsdp 1 x tensor 4" in capsys.readouterr().err
    (m1, e1), (m2, e2) = runs["train_mesh"], runs["rollout_mesh"]
    assert len(m1) == len(m2) == 1
    for a, b in zip(m1, m2):
        for key in ("reward_mean", "reward_std", "completion_length"):
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "weight_gini", "effective_token_ratio",
                    "residual_norm_mean"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert _strip_timing(e1) == _strip_timing(e2)
    for extra, message in ((["rollout.mesh_tensor=3"], "does not divide the device count 8"),
                           (["rollout.mesh_tensor=8"], "rollout.mesh_tensor: tensor=8 does not "
                                                       "split"),
                           (["train.mode=jit", "rollout.mesh_fsdp=2"], "not 'mesh'"),
                           (["rollout.mesh_tensor=0"], "mesh_tensor must be >= 1")):
        assert cli.main(["train", "--output-dir", str(tmp_path / "refused")] + [
            a for o in overrides + extra for a in ("--set", o)]) == 2
        assert message in capsys.readouterr().err, message


@pytest.mark.slow
def test_mesh_tensor_2_equals_fsdp_8_and_resumes_on_it(tmp_path, capsys):
    """train.mode=mesh on 8 devices. The reference run splits its train state over fsdp 8 (ZeRO:
    each device 1/8 of every factor and moment). A run with tensor 2 (heads and MLP split over
    pairs of devices, fsdp 2, data 2) logs the same first step: the same sampled tokens, hence
    rewards and evaluations, and losses, gradients and weight statistics to float rounding. Its
    checkpoint of step 1 then resumes on fsdp 8 and ends as the reference: the adapter of step 2
    within float rounding. train.mesh_fsdp and train.mesh_tensor (and the rollout mesh's) are what
    a resume may change; anything else refuses."""
    overrides = _mesh_run(steps=2, save_every=1) + ["optim.warmup_steps=0"]
    fsdp8 = config.load(None, overrides + ["train.mesh_fsdp=8"])
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    assert train.train(fsdp8, ref)["finished"]
    assert "split over fsdp 8" in capsys.readouterr().err
    tensor2 = config.load(None, overrides + ["train.mesh_fsdp=2", "train.mesh_tensor=2"])
    train.train(tensor2, run, stop_after=1)
    assert "split over fsdp 2" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["1"]
    assert cli.main(["train", "--output-dir", run, "--resume"] + [
        a for o in overrides + ["train.mesh_fsdp=8", "optim.learning_rate=0.5"]
        for a in ("--set", o)]) == 2
    assert ("only train.mesh_fsdp, train.mesh_tensor, rollout.mesh_fsdp, rollout.mesh_tensor "
            "may change") in capsys.readouterr().err
    assert train.train(fsdp8, run, resume=True)["finished"]
    err = capsys.readouterr().err
    assert "resumed from the checkpoint of step 1" in err and "split over fsdp 8" in err
    got, want = _rows(run, "metrics.jsonl"), _rows(ref, "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2]
    for a, b in zip(got, want):
        for key in ("reward_mean", "reward_std", "completion_length"):
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "weight_gini", "effective_token_ratio",
                    "residual_norm_mean", "entropy", "learning_rate"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert got[-1]["residual_norm_mean"] > 0
    assert [e["greedy_accuracy"] for e in _rows(run, "eval.jsonl")] == \
        [e["greedy_accuracy"] for e in _rows(ref, "eval.jsonl")]
    # per factor ||a - b|| <= 2e-4 ||b||: the two layouts sum each gradient in different orders,
    # and Adam's first step, lr g / (|g| + eps), turns the rounding of an entry whose gradient is
    # near eps into a visible change of that entry (measured after step 1: 5.6e-5 of ||b|| in
    # one factor; a wrong split or a lost shard moves whole factors, by ~||b||)
    for step in (1, 2):
        a = trainer.load_run(run, step)[2]
        b = trainer.load_run(ref, step)[2]
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            assert np.linalg.norm(x - y) <= 2e-4 * np.linalg.norm(y), step
    first = trainer.load_run(ref, 1)[2]
    moved_by = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(
        jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(b)))
    assert moved_by > 1e-3  # step 2 changed the adapter: the comparison is not of two copies
