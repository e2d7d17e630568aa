"""Seeds: `arca-jax sweep --seeds`, and the report's arms, bootstrap intervals and paired
comparisons on synthetic run directories with known per-problem results."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from arca_jax import cli
from arca_jax.report import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_means, group_arms,
                             interval_table, intervals_markdown, load_run, load_runs,
                             paired_table, percentile_interval, reference_arm, write_report)
from arca_jax.report.intervals import (NO_INTERVAL, NO_INTERVAL_NO_PROBLEMS,
                                       OVER_PROBLEMS, OVER_SEEDS, OVER_SEEDS_AND_PROBLEMS,
                                       OVER_SEEDS_NO_PROBLEMS)
from fixtures import write_jsonl


# ---------------------------------------------------------------------------------------------
# Synthetic runs with per-problem results
# ---------------------------------------------------------------------------------------------


def make_run(root: Path, name: str, method: str, rank: int, seed: int, greedy, correct=None, *,
             k: int = 4, gini: float = 0.5, effn: float = 0.5, reward: float = 0.5,
             per_problem: bool = True, extra: dict | None = None, finished: bool = True) -> Path:
    """A finished 2-step run whose final evaluation has the given per-problem results (greedy
    rewards, correct-of-k counts; correct defaults to k where greedy is 1, else 0)."""
    d = root / name
    d.mkdir(parents=True)
    greedy = [float(g) for g in greedy]
    correct = [k if g else 0 for g in greedy] if correct is None else list(correct)
    config = {"model": {"path": "tiny/arith-model"}, "task": {"name": "arithmetic"},
              "grpo": {"weighting": method, "logits_dtype": "float32"},
              "lora": {"rank": rank, "alpha": 2 * rank}, "train": {"seed": seed, "steps": 2}}
    for dotted, value in (extra or {}).items():
        section, key = dotted.split(".")
        config[section][key] = value
    (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    write_jsonl(d / "metrics.jsonl", [
        {"step": s, "reward_mean": reward, "weight_gini": gini, "effective_token_ratio": effn}
        for s in (1, 2)])
    acc = float(np.mean(greedy))
    pass_k = float(np.mean([c > 0 for c in correct]))
    final = {"step": 2, "greedy_accuracy": acc, "pass_at_k": pass_k, "k": k,
             "num_problems": len(greedy)}
    if per_problem:
        final.update(greedy=greedy, correct_of_k=correct)
    write_jsonl(d / "eval.jsonl", [{"step": 0, "greedy_accuracy": 0.1, "pass_at_k": 0.2, "k": k,
                                     "num_problems": len(greedy)}, final])
    summary = {"method": method, "rank": rank, "final_greedy_accuracy": acc,
               "final_pass_at_k": pass_k, "k": k, "mean_train_reward": reward,
               "mean_weight_gini": gini, "mean_effective_token_ratio": effn, "steps": 2,
               "finished": finished}
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


def reference_bootstrap(x, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """The documented two-level bootstrap, written out plainly: seeds, then problems per seed."""
    x = np.asarray(x, dtype=np.float64)
    s_count, p_count = x.shape
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        seeds = rng.integers(0, s_count, size=s_count)
        problems = rng.integers(0, p_count, size=(s_count, p_count))
        cells = [x[seeds[i], problems[i, j]] for i in range(s_count) for j in range(p_count)]
        stats.append(np.mean(cells))
    stats = np.array(stats)
    return stats, tuple(np.percentile(stats, [2.5, 97.5]))


RNG = np.random.default_rng(0)
GREEDY = {  # per seed, 12 problems
    1: RNG.integers(0, 2, 12), 2: RNG.integers(0, 2, 12), 3: RNG.integers(0, 2, 12)}
GREEDY_U = {1: RNG.integers(0, 2, 12), 2: RNG.integers(0, 2, 12)}


@pytest.fixture
def seeded(tmp_path):
    """ARCA r16 with seeds 1-3, uniform r16 with seeds 1-2 (float32 logits), uniform r16 seed 1
    with bfloat16 logits."""
    root = tmp_path / "runs"
    dirs = [make_run(root, f"arca_r16-seed{s}", "arca", 16, s, g, gini=0.6 + 0.1 * s,
                     effn=0.3 - 0.05 * s, reward=0.1 * s) for s, g in GREEDY.items()]
    dirs += [make_run(root, f"uniform_r16-seed{s}", "uniform", 16, s, g, gini=0.0, effn=1.0)
             for s, g in GREEDY_U.items()]
    dirs.append(make_run(root, "uniform_r16_bf16-seed1", "uniform", 16, 1, GREEDY_U[1],
                         extra={"grpo.logits_dtype": "bfloat16"}))
    return dirs


# ---------------------------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_matches_the_plain_reference():
    x = np.array([GREEDY[1], GREEDY[2], GREEDY[3]], dtype=float)
    stats, (lo, hi) = reference_bootstrap(x, resamples=300)
    np.testing.assert_allclose(bootstrap_means(x, resamples=300), stats, rtol=0, atol=1e-12)
    assert percentile_interval(bootstrap_means(x, resamples=300)) == pytest.approx((lo, hi))


def test_interval_contains_the_mean_and_shrinks_with_more_problems():
    x = np.array([[1, 0, 1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1, 0, 1]], dtype=float)
    lo, hi = percentile_interval(bootstrap_means(x))
    assert lo <= x.mean() <= hi and hi > lo
    big = np.tile(x, (1, 16))  # same per-seed accuracies, 16 times the problems
    blo, bhi = percentile_interval(bootstrap_means(big))
    assert blo <= big.mean() <= bhi and (bhi - blo) < 0.6 * (hi - lo)


def test_interval_is_degenerate_for_identical_constant_seeds():
    assert percentile_interval(bootstrap_means(np.ones((3, 10)))) == (1.0, 1.0)
    assert percentile_interval(bootstrap_means(np.full((4, 1), 0.37))) == pytest.approx(
        (0.37, 0.37))


def test_bootstrap_is_deterministic():
    x = np.array([GREEDY[1], GREEDY[2]], dtype=float)
    np.testing.assert_array_equal(bootstrap_means(x), bootstrap_means(x))


# ---------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------


def test_runs_group_into_arms_by_everything_but_the_seed(seeded):
    arms = group_arms(load_runs(seeded))
    assert [(a.label, a.seeds) for a in arms] == [
        ("uniform r16 (grpo.logits_dtype=bfloat16)", (1,)),
        ("uniform r16 (grpo.logits_dtype=float32)", (1, 2)),
        ("ARCA r16", (1, 2, 3)),
    ]
    arca = arms[2]
    assert [r.name for r in arca.runs] == ["arca_r16-seed1", "arca_r16-seed2", "arca_r16-seed3"]
    assert "train.seed" not in arca.settings and arca.settings["lora.rank"] == 16


def test_interval_row_over_seeds_and_problems(seeded):
    arms = group_arms(load_runs(seeded))
    row = interval_table(arms)[2]  # ARCA r16, 3 seeds
    x = np.array([GREEDY[s] for s in (1, 2, 3)], dtype=float)
    _, (lo, hi) = reference_bootstrap(x)
    assert (row.seeds, row.seed_list, row.problems, row.k) == (3, "1 2 3", 12, 4)
    assert row.accuracy_interval == OVER_SEEDS_AND_PROBLEMS
    assert row.greedy_mean == pytest.approx(x.mean())
    assert (row.greedy_lo, row.greedy_hi) == pytest.approx((lo, hi))
    assert row.greedy_lo <= row.greedy_mean <= row.greedy_hi
    # pass@k: any of the k samples correct (here exactly where greedy is correct)
    assert row.pass_at_k_mean == pytest.approx(x.mean())
    # Gini: bootstrap over seeds of the per-run means 0.7, 0.8, 0.9
    _, (glo, ghi) = reference_bootstrap(np.array([[0.7], [0.8], [0.9]]))
    assert row.seed_interval == OVER_SEEDS
    assert row.gini_mean == pytest.approx(0.8)
    assert (row.gini_lo, row.gini_hi) == pytest.approx((glo, ghi))
    assert row.train_reward_mean == pytest.approx(0.2)
    assert 0.7 - 1e-9 <= row.gini_lo < row.gini_hi <= 0.9 + 1e-9  # never beyond the seeds


def test_one_seed_has_a_problem_interval_only(seeded):
    arms = group_arms(load_runs(seeded))
    row = interval_table(arms)[0]  # uniform bf16, one seed
    _, (lo, hi) = reference_bootstrap(np.array([GREEDY_U[1]], dtype=float))
    assert row.accuracy_interval == OVER_PROBLEMS and row.seed_interval == NO_INTERVAL
    assert (row.greedy_lo, row.greedy_hi) == pytest.approx((lo, hi))
    assert row.gini_lo is None and row.train_reward_hi is None
    md = intervals_markdown(interval_table(arms))
    assert "| 0.500 [n/a] |" in md and "problems (1 seed), 12 problems" in md


def test_paired_difference_is_the_hand_computed_mean(seeded):
    arms = group_arms(load_runs(seeded))
    arca = arms[2]
    ref = reference_arm(arca, arms)
    assert ref.label == "uniform r16 (grpo.logits_dtype=float32)"  # the arca config's dtype
    (row,) = paired_table(arms)
    # seeds both ran: 1 and 2 (arca's seed 3 has no uniform partner)
    d = np.array([GREEDY[1] - GREEDY_U[1], GREEDY[2] - GREEDY_U[2]], dtype=float)
    assert (row.seeds, row.seed_list, row.problems) == (2, "1 2", 12)
    assert row.greedy_diff == pytest.approx(d.mean())
    assert row.greedy_diff == pytest.approx(
        np.mean([GREEDY[s].mean() - GREEDY_U[s].mean() for s in (1, 2)]))
    stats, (lo, hi) = reference_bootstrap(d)
    assert (row.greedy_diff_lo, row.greedy_diff_hi) == pytest.approx((lo, hi))
    assert row.greedy_share_below_0 == pytest.approx(np.mean(stats < 0))
    assert row.pass_at_k_diff == pytest.approx(d.mean())


def test_reference_prefers_the_uniform_arm_with_the_same_settings(seeded, tmp_path):
    extra = make_run(tmp_path / "more", "arca_bf16-seed1", "arca", 16, 1, GREEDY[1],
                     extra={"grpo.logits_dtype": "bfloat16"})
    arms = group_arms(load_runs(seeded + [extra]))
    bf16 = next(a for a in arms if a.method == "arca" and "bfloat16" in a.label)
    assert reference_arm(bf16, arms).label == "uniform r16 (grpo.logits_dtype=bfloat16)"
    assert bf16.label == "ARCA r16 (grpo.logits_dtype=bfloat16)"


def test_per_problem_lists_must_match_num_problems(tmp_path):
    d = make_run(tmp_path, "r", "arca", 4, 1, [1, 0, 1])
    lines = (d / "eval.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["greedy"] = [1.0, 0.0]
    (d / "eval.jsonl").write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"eval\.jsonl:2: greedy has 2 values"):
        load_run(d)


# ---------------------------------------------------------------------------------------------
# Old runs, the written report
# ---------------------------------------------------------------------------------------------


def test_old_runs_without_per_problem_fields_load_and_report(tmp_path):
    root = tmp_path / "runs"
    dirs = [make_run(root, f"arca-seed{s}", "arca", 4, s, GREEDY[s], per_problem=False)
            for s in (1, 2, 3)]
    dirs += [make_run(root, "uniform-seed1", "uniform", 4, 1, GREEDY_U[1], per_problem=False)]
    runs = load_runs(dirs)
    assert all(e.greedy is None and e.correct_of_k is None for r in runs for e in r.evals)
    arms = group_arms(runs)
    uni, arca = interval_table(arms)
    assert arca.accuracy_interval == OVER_SEEDS_NO_PROBLEMS and arca.problems is None
    _, (lo, hi) = reference_bootstrap(np.array([[GREEDY[s].mean()] for s in (1, 2, 3)]))
    assert (arca.greedy_lo, arca.greedy_hi) == pytest.approx((lo, hi))
    assert uni.accuracy_interval == NO_INTERVAL_NO_PROBLEMS and uni.greedy_lo is None
    (paired,) = paired_table(arms)
    assert paired.seeds == 1 and paired.greedy_diff_lo is None
    assert paired.greedy_diff == pytest.approx(GREEDY[1].mean() - GREEDY_U[1].mean())
    paths = write_report(dirs, tmp_path / "out")
    md = paths.report_md.read_text()
    assert "no per-problem results" in md and "## Seeds and intervals" in md


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_with_seeds_shows_arm_means_and_intervals(seeded, tmp_path):
    paths = write_report(seeded, tmp_path / "out")
    md = paths.report_md.read_text()
    assert "## Seeds and intervals" in md and "## Paired against uniform" in md
    assert "mean of 3: arca_r16-seed1, arca_r16-seed2, arca_r16-seed3" in md
    assert "[grpo.logits_dtype=bfloat16] uniform_r16_bf16-seed1" in md
    x = np.array([GREEDY[s] for s in (1, 2, 3)], dtype=float)
    # the performance table's ARCA row: the mean over seeds
    assert f"| ARCA | 16 | n/a | {x.mean():.3f} |" in paths.performance_md.read_text()
    rows = _csv(paths.intervals_csv)
    assert [r["arm"] for r in rows][-1] == "ARCA r16"
    assert float(rows[-1]["greedy_mean"]) == pytest.approx(x.mean())
    assert rows[-1]["runs"] == "arca_r16-seed1 arca_r16-seed2 arca_r16-seed3"
    (paired,) = _csv(paths.paired_csv)
    assert paired["reference"] == "uniform r16 (grpo.logits_dtype=float32)"
    assert paired["seeds"] == "2"
    assert len(_csv(paths.performance_csv)) == 6  # the CSV keeps one row per run
    assert "Where an arm has several seeds" in paths.comparison_md.read_text()
    assert write_report(seeded, tmp_path / "again").report_md.read_text() == md  # deterministic


# ---------------------------------------------------------------------------------------------
# arca-jax sweep --seeds
# ---------------------------------------------------------------------------------------------


def test_sweep_plan_with_seeds_names_one_directory_per_config_and_seed(tmp_path):
    root = tmp_path / "runs"
    (root / "a-seed2").mkdir(parents=True)
    (root / "a-seed2" / "summary.json").write_text('{"finished": true}')
    (root / "b-seed1" / "checkpoints").mkdir(parents=True)
    plan = cli.sweep_plan(["x/a.yaml", "y/b.yaml"], str(root), seeds=[1, 2])
    assert [(os.path.basename(d), a) for _, d, a in plan] == [
        ("a-seed1", "start"), ("a-seed2", "skip"), ("b-seed1", "resume"), ("b-seed2", "start")]
    assert [p for p, _, _ in plan] == ["x/a.yaml", "x/a.yaml", "y/b.yaml", "y/b.yaml"]
    # without seeds: today's names
    assert [os.path.basename(d) for _, d, _ in cli.sweep_plan(["x/a.yaml"], str(root))] == ["a"]
    assert cli.sweep_overrides(["grpo.weighting=arca"], 7) == ["grpo.weighting=arca",
                                                             "train.seed=7"]
    assert cli.sweep_overrides(["k=v"]) == ["k=v"]


@pytest.fixture
def fake_train(monkeypatch):
    import arca_jax.train

    calls = []

    def train(cfg, run_dir, resume=False, **kw):
        calls.append((os.path.basename(run_dir), cfg.train.seed, cfg.grpo.weighting, resume))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"finished": True}, f)
        return {"finished": True}

    monkeypatch.setattr(arca_jax.train, "train", train)
    return calls


def _configs(tmp_path):
    paths = []
    for method in ("uniform", "arca"):
        p = tmp_path / f"{method}_r4.yaml"
        p.write_text(yaml.safe_dump({"grpo": {"weighting": method}, "lora": {"rank": 4},
                                     "train": {"seed": 99, "steps": 1}}))
        paths.append(str(p))
    return paths


def test_sweep_with_seeds_sets_train_seed_per_run(tmp_path, fake_train, capsys):
    configs, root = _configs(tmp_path), str(tmp_path / "runs")
    argv = ["sweep", *configs, "--root", root, "--seeds", "1337,1338",
            "--set", "grpo.weighting=surprisal"]
    assert cli.main(argv) == 0
    assert fake_train == [("uniform_r4-seed1337", 1337, "surprisal", False),
                          ("uniform_r4-seed1338", 1338, "surprisal", False),
                          ("arca_r4-seed1337", 1337, "surprisal", False),
                          ("arca_r4-seed1338", 1338, "surprisal", False)]
    fake_train.clear()
    assert cli.main(argv) == 0 and fake_train == []  # all finished: skipped
    assert "skip" in capsys.readouterr().err
    assert cli.main(["sweep", configs[0], "--root", root]) == 0  # no --seeds: the config's seed
    assert fake_train == [("uniform_r4", 99, "uniform", False)]


@pytest.mark.parametrize("tail, message", [
    (["--seeds", "1,x"], "comma-separated integers"),
    (["--seeds", "3,3"], "given twice"),
    (["--seeds", "1", "--set", "train.seed=5"], "drop --set train.seed"),
])
def test_sweep_bad_seeds_exit_2(tmp_path, fake_train, capsys, tail, message):
    argv = ["sweep", *_configs(tmp_path), "--root", str(tmp_path / "runs"), *tail]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err and fake_train == []
