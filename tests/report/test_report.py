"""Tests for arca_jax.report on small synthetic run directories with hand-computed expectations."""
import argparse
import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from arca_jax import report
from arca_jax.report import (
    PAPER_DIAGNOSTICS,
    PAPER_PERFORMANCE,
    DiagnosticsRow,
    PerformanceRow,
    choose_sample,
    comparison_markdown,
    diagnostics_table,
    effective_token_ratio,
    format_params,
    gini,
    load_run,
    load_runs,
    main,
    performance_table,
    trailing_mean,
    write_report,
)
from arca_jax.report.heatmap import _wrap_lines
from arca_jax.report.load import _parse_sample
from fixtures import REPO, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRICKY_TOKEN = "<script>&\"x\"</script>"


# ---------------------------------------------------------------------------------------------
# Synthetic run directories
# ---------------------------------------------------------------------------------------------


def _weights(n: int, peak: int, sharp: float) -> list:
    """Weights summing to 1 with a bump at ``peak`` (sharp=0 gives uniform)."""
    a = np.exp(-sharp * np.abs(np.arange(n) - peak))
    return list(a / a.sum())


def _sample(step: int, reward: float, tokens=("The", " answer", " is", "\n", TRICKY_TOKEN, " 4")):
    n = len(tokens)
    return {
        "step": step, "prompt": "What is 2+2? <b>", "completion": "".join(tokens),
        "reward": reward, "tokens": list(tokens),
        "weights": {"uniform": _weights(n, 0, 0.0), "surprisal": _weights(n, 1, 8.0),
                    "entropy_reduction": _weights(n, 2, 8.0), "divergence": _weights(n, 3, 8.0),
                    "arca": _weights(n, 4, 0.7)},
    }


def make_run(root: Path, name: str, method: str, rank: int, *, gini_values=(0.2, 0.4, 0.6),
             eff_values=(0.9, 0.7, 0.5), rewards=(0.0, 0.5, 1.0), evals=None, samples=(),
             summary="auto", steps_planned=None) -> Path:
    """A run directory whose metrics have the given per-step values (steps 1..n)."""
    d = root / name
    d.mkdir(parents=True)
    n = len(rewards)
    config = {"model": {"path": "tiny/arith-model"}, "task": {"name": "arithmetic"},
              "grpo": {"weighting": method}, "lora": {"rank": rank, "alpha": 2 * rank},
              "train": {"seed": 7, "steps": steps_planned or n}}
    (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    metrics = []
    for i in range(n):
        metrics.append({
            "step": i + 1, "reward_mean": rewards[i], "reward_std": 0.1, "loss": 0.5,
            "grad_norm": 1.0, "learning_rate": 1e-5, "weight_gini": gini_values[i],
            "effective_token_ratio": eff_values[i],
            "residual_norm_mean": 2.0 if method == "arca" else None,
            "residual_norm_max": 3.0 if method == "arca" else None, "kl": 0.0,
            "completion_length": 50, "time_sample_s": 1.0, "time_score_s": 0.1,
            "time_update_s": 0.5, "tokens_per_s": 100.0})
    write_jsonl(d / "metrics.jsonl", metrics)
    if evals is None:
        evals = [(0, 0.10, 0.20), (n, 0.30, 0.45)]
    write_jsonl(d / "eval.jsonl", [{"step": s, "greedy_accuracy": g, "pass_at_k": p, "k": 4,
                                     "num_problems": 20} for s, g, p in evals])
    if samples:
        write_jsonl(d / "samples.jsonl", list(samples))
    if summary == "auto":
        summary = {"method": method, "rank": rank, "trainable_params": 1000 * rank,
                   "base_greedy_accuracy": evals[0][1], "base_pass_at_k": evals[0][2],
                   "final_greedy_accuracy": evals[-1][1], "final_pass_at_k": evals[-1][2],
                   "k": 4, "mean_train_reward": float(np.mean(rewards)),
                   "mean_weight_gini": float(np.mean(gini_values)),
                   "mean_effective_token_ratio": float(np.mean(eff_values)),
                   "steps": n, "wall_time_s": 12.0, "finished": True}
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


SWEEP = [("arca", 64), ("divergence", 64), ("uniform", 64), ("arca", 4),
         ("entropy_reduction", 64), ("surprisal", 64), ("arca", 16)]


@pytest.fixture
def sweep(tmp_path):
    """The paper's seven arms, created in scrambled order; the ARCA arms log samples."""
    dirs = []
    for i, (method, rank) in enumerate(SWEEP):
        samples = ()
        if method == "arca":
            samples = (_sample(1, 1.0), _sample(2, 1.0, ("A", "\n", "B")), _sample(3, 0.0))
        g = 0.1 * (i + 1)
        dirs.append(make_run(tmp_path / "runs", f"{method}_r{rank}", method, rank,
                             gini_values=(g, g + 0.02, g + 0.04), samples=samples))
    return dirs


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_run_reads_all_files(tmp_path):
    d = make_run(tmp_path, "r", "arca", 16, samples=[_sample(2, 1.0)])
    run = load_run(d)
    assert (run.name, run.method, run.rank, run.finished) == ("r", "arca", 16, True)
    assert (run.model, run.task, run.seed, run.steps_planned) == ("tiny/arith-model",
                                                                  "arithmetic", 7, 3)
    np.testing.assert_array_equal(run.metrics.steps, [1, 2, 3])
    np.testing.assert_allclose(run.metrics.values("weight_gini"), [0.2, 0.4, 0.6])
    assert [e.step for e in run.evals] == [0, 3]
    assert run.samples[0].tokens[4] == TRICKY_TOKEN
    assert set(run.samples[0].weights) == set(report.MODES)
    assert run.summary.trainable_params == 16000
    assert run.notes == []


def test_metrics_null_values_become_nan_and_are_skipped_in_means(tmp_path):
    d = make_run(tmp_path, "u", "uniform", 64)
    run = load_run(d)
    assert np.isnan(run.metrics.values("residual_norm_mean")).all()
    assert run.metrics.mean("residual_norm_mean") is None
    assert run.metrics.mean("no_such_key") is None


def test_truncated_last_line_is_ignored_with_a_note(tmp_path):
    d = make_run(tmp_path, "r", "surprisal", 64, summary=None)
    with open(d / "metrics.jsonl", "ab") as f:  # killed mid-write, inside a multi-byte char
        f.write('{"step": 4, "reward_mean": 1.0, "note": "\u00e9'.encode()[:-1])
    with open(d / "eval.jsonl", "a") as f:
        f.write('{"step": 4, "greedy_acc')
    run = load_run(d)
    assert list(run.metrics.steps) == [1, 2, 3]
    assert [e.step for e in run.evals] == [0, 3]
    assert any("metrics.jsonl" in n and "incomplete last line" in n for n in run.notes)
    assert any("eval.jsonl" in n for n in run.notes)


def test_corrupt_line_before_the_last_is_an_error(tmp_path):
    d = make_run(tmp_path, "r", "uniform", 64)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        load_run(d)


def test_repeated_steps_keep_the_later_record(tmp_path):
    d = make_run(tmp_path, "r", "uniform", 64, summary=None)
    with open(d / "metrics.jsonl", "a") as f:  # a resumed run re-logs step 2
        f.write(json.dumps({"step": 2, "reward_mean": 0.25, "weight_gini": 0.0,
                            "effective_token_ratio": 1.0}) + "\n")
    run = load_run(d)
    np.testing.assert_array_equal(run.metrics.steps, [1, 2, 3])
    np.testing.assert_allclose(run.metrics.values("reward_mean"), [0.0, 0.25, 1.0])
    assert any("logged more than once" in n and "2" in n for n in run.notes)


def _no_config(d):
    (d / "config.yaml").unlink()


def _bad_yaml(d):
    (d / "config.yaml").write_text("grpo: [unclosed\n")


def _no_weighting(d):
    (d / "config.yaml").write_text(yaml.safe_dump({"grpo": {"weighting": 3},
                                                   "lora": {"rank": 4}}))


def _no_rank(d):
    (d / "config.yaml").write_text(yaml.safe_dump({"grpo": {"weighting": "arca"}}))


def _no_metrics(d):
    (d / "metrics.jsonl").unlink()


def _metric_not_a_number(d):
    (d / "metrics.jsonl").write_text('{"step": 1, "weight_gini": "high"}\n{"step": 2}\n')


def _metric_without_step(d):
    (d / "metrics.jsonl").write_text('{"reward_mean": 1.0}\n{"step": 2}\n')


def _metrics_not_objects(d):
    (d / "metrics.jsonl").write_text('[1, 2]\n{"step": 2}\n')


def _sample_weights_wrong_length(d):
    s = _sample(1, 1.0)
    s["weights"]["arca"] = s["weights"]["arca"][:-1]
    write_jsonl(d / "samples.jsonl", [s, _sample(2, 1.0)])


@pytest.mark.parametrize("breaker, filename, message", [
    (_no_config, "config.yaml", "missing"),
    (_bad_yaml, "config.yaml", "not valid YAML"),
    (_no_weighting, "config.yaml", "grpo.weighting is 3"),
    (_no_rank, "config.yaml", "lora.rank"),
    (_no_metrics, "metrics.jsonl", "missing"),
    (_metric_not_a_number, "metrics.jsonl:1", "weight_gini must be a number"),
    (_metric_without_step, "metrics.jsonl:1", "missing 'step'"),
    (_metrics_not_objects, "metrics.jsonl:1", "expected a JSON object"),
    (_sample_weights_wrong_length, "samples.jsonl:1", "5 values for 6 tokens"),
])
def test_bad_run_directories_raise_value_error_naming_the_file(tmp_path, breaker, filename,
                                                               message):
    d = make_run(tmp_path, "r", "arca", 4)
    breaker(d)
    with pytest.raises(ValueError) as info:
        load_run(d)
    assert filename in str(info.value) and message in str(info.value)


def test_a_users_weighting_is_a_method_of_its_own(tmp_path):
    """A run of a weighting the report does not know (a user's registered name or import path):
    loaded, ordered after the paper's five, labelled by its name, a heatmap row of its own."""
    name = "my_weightings:arca_x_surprisal"
    sample = _sample(1, 1.0)
    sample["weights"][name] = _weights(6, 5, 2.0)
    user = make_run(tmp_path, "user", name, 4, samples=[sample])
    arca = make_run(tmp_path, "arca", "arca", 4)
    runs = report.sort_runs(load_runs([user, arca]))
    assert [r.method for r in runs] == ["arca", name]
    assert [r.mode for r in report.heatmap_rows(runs[1].samples[0])][-1] == name
    assert f"| {name} | 4 |" in comparison_markdown(runs)
    paths = write_report([user, arca], tmp_path / "out", heatmap_run="user")
    assert name in paths.report_md.read_text() and name in paths.heatmap_html.read_text()


def _with_settings(run_dir: Path, **sections) -> Path:
    """Adds settings to a run's config.yaml, e.g. grpo={"ratio_level": "sequence"}."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return run_dir


def test_objective_variants_are_named(tmp_path):
    """GSPO, DAPO and ARCA's layer / relative variants: named in the tables' method column, the
    arm labels, comparison.md and the heatmap (the "arca" row of a layered run says so)."""
    sample = _sample(1, 1.0)
    dirs = [make_run(tmp_path, "uniform", "uniform", 64),
            _with_settings(make_run(tmp_path, "gspo", "uniform", 64),
                           grpo={"ratio_level": "sequence", "num_iterations": 2}),
            _with_settings(make_run(tmp_path, "dapo", "uniform", 64),
                           grpo={"clip_eps_high": 0.28, "loss_aggregation": "token_mean"},
                           rollout={"dynamic_sampling": True, "overlong_buffer": 16}),
            make_run(tmp_path, "arca", "arca", 64),
            _with_settings(make_run(tmp_path, "arca_all", "arca", 64, samples=[sample]),
                           grpo={"arca_layers": "all"}),
            _with_settings(make_run(tmp_path, "arca_rel", "arca", 64),
                           grpo={"arca_layers": [0, 2], "arca_relative": True})]
    runs = load_runs(dirs)
    assert [r.label for r in report.sort_runs(runs)] == [
        "uniform r64 [DAPO]", "uniform r64 [GSPO]", "uniform r64", "ARCA r64",
        "ARCA r64 [layers=all]", "ARCA r64 [layers=0,2, relative]"]  # by run name in an arm
    assert {a.label for a in report.group_arms(runs)} == {r.label for r in runs}  # no extras
    assert report.objective_tags({"grpo": {"behaviour_correction": "tis"}}) == ("TIS",)
    assert report.objective_tags({"grpo": {"clip_ratio_max": 3.0, "top_entropy_quantile": 0.2,
                                           "arca_relative": True}}) == (
        "dual-clip 3", "entropy top 0.2", "relative")
    assert report.objective_tags({"grpo": {"policy_loss": "cispo", "ratio_level": "sequence"},
                                  "rollout": {"dynamic_sampling": True}}) == (
        "GSPO", "CISPO", "DAPO")
    assert report.objective_tags({"grpo": {"clip_ratio_max": None,
                                           "top_entropy_quantile": 1.0}}) == ()
    md = report.performance_markdown(performance_table(runs))
    for cell in ("| uniform [GSPO] | 64 |", "| uniform [DAPO] | 64 |", "| ARCA [layers=all] | 64 |",
                 "| ARCA [layers=0,2, relative] | 64 |", "| ARCA | 64 |", "| uniform | 64 |"):
        assert cell in md, cell
    assert "| uniform [DAPO] | 64 |" in report.diagnostics_markdown(diagnostics_table(runs))
    assert "| ARCA [layers=all] | 64 |" in comparison_markdown(runs)
    paths = write_report(dirs, tmp_path / "out", heatmap_run="arca_all")
    html_text = paths.heatmap_html.read_text()
    assert "ARCA [layers=all]:" in html_text and "(ARCA r64 [layers=all])" in html_text
    assert "uniform [GSPO]" in paths.report_md.read_text()
    assert report.row_label("surprisal", runs[4]) == "surprisal"  # only the arca row changes


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_run(tmp_path / "nope")


def test_corrupt_summary_means_unfinished(tmp_path):
    d = make_run(tmp_path, "r", "uniform", 64)
    (d / "summary.json").write_text('{"method": "uniform", "fini')
    run = load_run(d)
    assert run.summary is None and not run.finished
    assert any("summary.json" in n for n in run.notes)


def test_duplicate_names_are_disambiguated_and_repeated_dirs_rejected(tmp_path):
    a = make_run(tmp_path / "seed1", "arca", "arca", 4)
    b = make_run(tmp_path / "seed2", "arca", "arca", 4)
    assert [r.name for r in load_runs([a, b])] == ["seed1/arca", "seed2/arca"]
    with pytest.raises(ValueError, match="more than once"):
        load_runs([a, tmp_path / "seed1" / ".." / "seed1" / "arca"])
    with pytest.raises(ValueError, match="no run directories"):
        load_runs([])


#: The public names of ``arca_jax.report`` (those of the one-module days, then the seeds'); the
#: package re-exports them all.
PUBLIC_NAMES = (
    "MODES", "METHOD_LABELS", "METRICS_FILE", "EVAL_FILE", "SAMPLES_FILE", "SUMMARY_FILE",
    "CONFIG_FILE", "PaperSetting", "PaperPerformance", "PaperDiagnostics", "PAPER_SETTING",
    "PAPER_PERFORMANCE", "PAPER_DIAGNOSTICS", "Metrics", "EvalPoint", "Sample", "Summary", "Run",
    "config_get", "arm_label", "load_config", "load_metrics", "load_evals", "load_samples",
    "load_summary", "load_run", "load_runs", "sort_runs", "PerformanceRow", "DiagnosticsRow",
    "performance_row", "diagnostics_row", "performance_table", "diagnostics_table",
    "consistency_notes", "format_params", "markdown_table", "performance_markdown",
    "diagnostics_markdown", "write_csv", "comparison_markdown", "ReportError", "trailing_mean",
    "plot_reward_accuracy", "plot_weight_diagnostics", "HeatmapChoice", "HeatmapRow", "gini",
    "effective_token_ratio", "choose_sample", "heatmap_rows", "display_token", "plot_heatmap",
    "render_heatmap_html", "write_heatmap_html", "ReportPaths", "write_report", "add_arguments",
    "run", "main",
    # seeds and intervals (arms, intervals)
    "Arm", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "IntervalRow", "PairedRow",
    "arm_diagnostics_table", "arm_key", "arm_performance_table", "arm_settings",
    "bootstrap_means", "group_arms", "interval_table", "intervals_markdown", "paired_markdown",
    "paired_table", "percentile_interval", "reference_arm",
    # objectives and ARCA's measurement in labels
    "method_cell", "objective_tags", "row_label",
)


def test_package_re_exports_every_public_name():
    assert sorted(report.__all__) == sorted(PUBLIC_NAMES)
    assert all(callable(getattr(report, n)) or n.isupper() for n in PUBLIC_NAMES)


def test_report_imports_and_runs_without_jax_or_eager_matplotlib(tmp_path):
    """``python -m arca_jax.report`` in a process where importing jax raises."""
    run_dir = make_run(tmp_path / "runs", "arca_r4", "arca", 4, samples=(_sample(1, 1.0),))
    code = textwrap.dedent(f"""
        import runpy, sys

        blocked = []  # also catches an import attempt that some caller swallows

        class BlockJax:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib"):
                    blocked.append(name)
                    raise ImportError(f"jax is blocked: {{name}}")
                return None

        sys.meta_path.insert(0, BlockJax())
        import arca_jax.report
        assert "matplotlib" not in sys.modules, "matplotlib imported eagerly"
        sys.argv = ["arca-jax report", {str(run_dir)!r}, "--out", {str(tmp_path / "out")!r}]
        code = 0
        try:
            runpy.run_module("arca_jax.report", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        assert not blocked, f"tried to import {{blocked}}"
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    assert (tmp_path / "out" / "heatmap.png").is_file()


def test_modes_match_the_credit_module():
    from arca_jax.credit import MODES

    assert report.MODES == MODES


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def test_tables_follow_the_papers_order(sweep):
    runs = load_runs(sweep)
    order = [(r.method, r.rank) for r in performance_table(runs)]
    assert order == [(p.method, p.rank) for p in PAPER_PERFORMANCE]
    assert [(r.method, r.rank) for r in diagnostics_table(runs)] == order
    assert [(p.method, p.rank) for p in PAPER_DIAGNOSTICS] == order


def test_unfinished_run_is_computed_from_the_logs(tmp_path):
    # Step 2 logs no Gini (null): the mean is over steps 1 and 3 only.
    d = make_run(tmp_path, "r", "arca", 4, gini_values=(0.2, None, 0.5), eff_values=(0.9, 0.6, 0.3),
                 rewards=(0.25, 0.5, 1.0), evals=[(0, 0.1, 0.2), (2, 0.35, 0.5)], summary=None,
                 steps_planned=10)
    (perf,) = performance_table([load_run(d)])
    (diag,) = diagnostics_table([load_run(d)])
    assert diag.gini == pytest.approx((0.2 + 0.5) / 2)
    assert diag.effective_token_ratio == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert diag.residual_norm_mean == pytest.approx(2.0)
    assert perf.mean_train_reward == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert (perf.greedy_accuracy, perf.pass_at_k, perf.k, perf.eval_step) == (0.35, 0.5, 4, 2)
    assert (perf.base_greedy_accuracy, perf.base_pass_at_k) == (0.1, 0.2)
    assert perf.trainable_params is None
    assert (perf.finished, perf.steps_done, perf.steps_planned) == (False, 3, 10)
    md = report.performance_markdown([perf])
    assert "3/10 (unfinished)" in md and "0.350 (step 2)" in md and "n/a" in md


def test_unfinished_run_without_evaluation_after_step_0(tmp_path):
    d = make_run(tmp_path, "r", "uniform", 64, evals=[(0, 0.1, 0.2)], summary=None)
    (perf,) = performance_table([load_run(d)])
    assert perf.greedy_accuracy is None and perf.base_greedy_accuracy == 0.1


def test_finished_run_uses_the_summary_and_notes_disagreements(tmp_path):
    d = make_run(tmp_path, "r", "divergence", 64)
    summary = json.loads((d / "summary.json").read_text())
    summary["mean_weight_gini"] = 0.9  # the logs give 0.4
    (d / "summary.json").write_text(json.dumps(summary))
    run = load_run(d)
    (diag,) = diagnostics_table([run])
    (perf,) = performance_table([run])
    assert diag.gini == 0.9
    assert (perf.greedy_accuracy, perf.trainable_params, perf.finished) == (0.30, 64000, True)
    notes = report.consistency_notes(run)
    assert len(notes) == 1 and "mean_weight_gini" in notes[0] and "0.4" in notes[0]


def test_finished_run_without_eval_file_takes_accuracy_from_the_summary(tmp_path):
    d = make_run(tmp_path, "r", "arca", 4)
    (d / "eval.jsonl").unlink()
    run = load_run(d)
    (perf,) = performance_table([run])
    assert (perf.greedy_accuracy, perf.pass_at_k, perf.eval_step) == (0.30, 0.45, 3)
    assert (perf.base_greedy_accuracy, perf.k) == (0.10, 4)
    assert any("eval.jsonl" in n and "missing" in n for n in run.notes)


def test_consistent_summary_gives_no_notes(tmp_path):
    run = load_run(make_run(tmp_path, "r", "arca", 16))
    assert report.consistency_notes(run) == []


def test_format_params_matches_the_paper():
    assert [format_params(n) for n in (69_730_304, 4_358_144, 17_432_576)] == \
        ["69.7M", "4.36M", "17.4M"]
    assert (format_params(999_999), format_params(512), format_params(None)) == ("1M", "512", "n/a")


def test_markdown_escapes_pipes_and_shows_pass_at_k_header(tmp_path):
    table = report.markdown_table(["a", "b"], [["x|y", 1]])
    assert "x\\|y" in table and table.count("\n") == 3
    run = load_run(make_run(tmp_path, "r", "uniform", 64))
    md = report.performance_markdown(performance_table([run]))
    assert "| pass@4 |" in md and "| uniform | 64 | 64K | 0.300 | 0.450 | 0.500 | 3/3 | r |" in md


def _parse_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_parses_back_to_the_table(sweep, tmp_path):
    runs = load_runs(sweep)
    perf, diag = performance_table(runs), diagnostics_table(runs)
    report.write_csv(tmp_path / "p.csv", perf, PerformanceRow)
    report.write_csv(tmp_path / "d.csv", diag, DiagnosticsRow)
    prows, drows = _parse_csv(tmp_path / "p.csv"), _parse_csv(tmp_path / "d.csv")
    assert [r["run"] for r in prows] == [r.run for r in perf]
    for row, back in zip(perf, prows):
        assert float(back["greedy_accuracy"]) == row.greedy_accuracy
        assert float(back["mean_train_reward"]) == row.mean_train_reward
        assert int(back["trainable_params"]) == row.trainable_params
        assert int(back["rank"]) == row.rank and back["finished"] == "true"
    for row, back in zip(diag, drows):
        assert float(back["gini"]) == row.gini
        assert float(back["effective_token_ratio"]) == row.effective_token_ratio
        assert back["residual_norm_mean"] == ("2.0" if row.method == "arca" else "")


def test_comparison_puts_paper_numbers_beside_ours(sweep):
    runs = load_runs(sweep[:2])  # arca r64 and divergence r64 only
    md = comparison_markdown(runs)
    assert "tiny/arith-model" in md and "arithmetic" in md and "Qwen/Qwen3-1.7B-Base" in md
    assert "differs from the paper's" in md
    # ARCA r64: paper greedy 0.590, ours 0.300; paper Gini 0.490, ours mean(0.1, 0.12, 0.14).
    assert re.search(r"\| ARCA \| 64 \| 0\.590 \| 0\.300 \| 0\.680 \| 0\.450 \|", md)
    assert re.search(r"\| ARCA \| 64 \| 0\.490 \| 0\.120 \| 0\.334 \| 0\.700 \| arca_r64 \|", md)
    assert re.search(r"\| surprisal \| 64 \| 0\.941 \| — \| 0\.052 \| — \| not run \|", md)


# ---------------------------------------------------------------------------------------------
# Heatmap
# ---------------------------------------------------------------------------------------------


def test_gini_and_effn_match_the_diagnostics_module():
    import jax.numpy as jnp

    from arca_jax.diagnostics import concentration_per_row

    w = np.random.default_rng(0).random((3, 9)) ** 4
    rows = concentration_per_row(jnp.asarray(w), jnp.ones_like(jnp.asarray(w)))
    for b in range(3):
        assert gini(w[b]) == pytest.approx(float(rows.gini[b]), abs=1e-5)
        assert effective_token_ratio(w[b]) == pytest.approx(
            float(rows.effective_token_ratio[b]), abs=1e-5)
    assert gini(np.full(5, 0.2)) == pytest.approx(0.0)
    assert gini(np.eye(4)[1]) == pytest.approx(0.75)
    assert effective_token_ratio(np.eye(4)[1]) == pytest.approx(0.25)


def test_default_heatmap_sample_is_the_latest_reward_1_of_the_top_arca_run(sweep):
    choice = choose_sample(load_runs(sweep))
    assert (choice.run.name, choice.sample.step, choice.sample.reward) == ("arca_r64", 2, 1.0)


def test_heatmap_sample_can_be_overridden(sweep):
    runs = load_runs(sweep)
    choice = choose_sample(runs, run="arca_r4", step=3)
    assert (choice.run.name, choice.sample.step) == ("arca_r4", 3)
    assert choose_sample(runs, run="arca_r16", index=0).sample.step == 1
    with pytest.raises(ValueError, match="not among the runs"):
        choose_sample(runs, run="nope")
    with pytest.raises(ValueError, match="no sample at step 9"):
        choose_sample(runs, run="arca_r4", step=9)
    with pytest.raises(ValueError, match="logged no samples"):
        choose_sample(runs, run="uniform_r64")
    with pytest.raises(ValueError, match="out of range"):
        choose_sample(runs, run="arca_r4", index=5)


def test_no_samples_means_no_heatmap(tmp_path):
    assert choose_sample([load_run(make_run(tmp_path, "r", "uniform", 64))]) is None


def test_heatmap_rows_are_in_paper_order_and_scaled_per_row():
    s = _parse_sample(_sample(1, 1.0), "x")
    rows = report.heatmap_rows(s)
    assert [r.mode for r in rows] == list(report.MODES)
    for r in rows:
        assert r.intensity.max() == pytest.approx(1.0)
        assert int(np.argmax(r.intensity)) == int(np.argmax(s.weights[r.mode]))
    assert rows[0].gini == pytest.approx(0.0) and rows[0].effective_token_ratio == pytest.approx(1)


def test_heatmap_html_escapes_tokens(sweep, tmp_path):
    choice = choose_sample(load_runs(sweep), run="arca_r4", step=1)
    page = report.render_heatmap_html(choice)
    assert "<script>" not in page
    assert "&lt;script&gt;&amp;&quot;x&quot;&lt;/script&gt;" in page
    assert "What is 2+2? &lt;b&gt;" in page
    # One row per method, each with one span per token.
    assert page.count("<tr>") == 5
    assert page.count("<span style=\"background:#") == 5 * 6 + 5  # + the 5-step colour scale


def test_wrap_lines_breaks_after_newlines_and_at_width():
    lines = _wrap_lines(["ab", "\n", "cd", "efg", "h"], line_chars=5)
    assert lines == [[0, 1], [2, 3], [4]]


def test_trailing_mean():
    np.testing.assert_allclose(trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2),
                               [1.0, 2.0, 4.0, 6.0])


# ---------------------------------------------------------------------------------------------
# The whole report and the command line
# ---------------------------------------------------------------------------------------------


def test_write_report_writes_every_file(sweep, tmp_path):
    # One unfinished run with a truncated metrics line joins the sweep.
    partial = make_run(tmp_path / "runs", "arca_r8_partial", "arca", 8, summary=None,
                       steps_planned=100)
    with open(partial / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    out = tmp_path / "report"
    paths = write_report(sweep + [partial], out, heatmap_step=1)  # the sample with TRICKY_TOKEN
    for png in (paths.reward_accuracy_png, paths.weight_diagnostics_png, paths.heatmap_png):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "&lt;script&gt;" in paths.heatmap_html.read_text()
    md = paths.report_md.read_text()
    for target in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / target).is_file(), target
    assert "3/100 (unfinished)" in md and "incomplete last line" in md
    # 10 files as before, plus intervals.csv and paired.csv
    assert len(paths.files()) == 12 and all(p.stat().st_size > 0 for p in paths.files())
    assert "## Seeds and intervals" in md and "## Paired against uniform" in md
    assert [r["run"] for r in _parse_csv(paths.performance_csv)][-4:] == [
        "arca_r4", "arca_r8_partial", "arca_r16", "arca_r64"]


def test_cli_writes_the_report(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(d) for d in sweep] + ["--out", str(out), "--heatmap-run", "arca_r4",
                                           "--heatmap-step", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert "step 3" in (out / "report.md").read_text()


def test_cli_plugs_into_a_subcommand(sweep, tmp_path):
    parser = argparse.ArgumentParser(prog="arca-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    report.add_arguments(sub.add_parser("report"))
    args = parser.parse_args(["report", str(sweep[0]), "--out", str(tmp_path / "o")])
    assert report.run(args) == 0 and (tmp_path / "o" / "performance.csv").is_file()


@pytest.mark.parametrize("argv_tail, message", [
    (["MISSING", "--out", "OUT"], "not a directory"),
    (["--out", "OUT", "--heatmap-run", "nope"], "not among the runs"),
    (["--out", "FILE"], "not a directory"),
])
def test_cli_bad_input_exits_2_without_traceback(sweep, tmp_path, capsys, argv_tail, message):
    (tmp_path / "FILE").write_text("x")
    argv = [str(sweep[0])] + [str(tmp_path / a) if a in ("OUT", "MISSING", "FILE") else a
                              for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "arca-jax report: error:" in err and message in err and "Traceback" not in err


def test_cli_usage_error_exits_2(capsys):
    assert main([]) == 2
    assert "usage: arca-jax report" in capsys.readouterr().err
