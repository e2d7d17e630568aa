"""The whole report: every table, plot and heatmap of some runs written into one directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from arca_jax.report.arms import arm_diagnostics_table, arm_performance_table, group_arms
from arca_jax.report.compare import _setting_line, comparison_markdown
from arca_jax.report.heatmap import (HeatmapChoice, _choice_caption, choose_sample, plot_heatmap,
                                     write_heatmap_html)
from arca_jax.report.intervals import (BOOTSTRAP_RESAMPLES, IntervalRow, PairedRow,
                                       interval_notes, interval_table, intervals_markdown,
                                       paired_markdown, paired_table)
from arca_jax.report.load import load_runs
from arca_jax.report.plots import plot_reward_accuracy, plot_weight_diagnostics
from arca_jax.report.records import Run, sort_runs
from arca_jax.report.tables import (DiagnosticsRow, PerformanceRow, consistency_notes,
                                    diagnostics_markdown, diagnostics_table, performance_markdown,
                                    performance_table, write_csv)

_SEEDS_TEXT = (
    "An arm is the runs whose config.yaml agree in everything but `train.seed`. Each value is the "
    "mean over the arm's seeds of the run's final value, with a 95% percentile bootstrap interval "
    f"({BOOTSTRAP_RESAMPLES} resamples, fixed RNG seed: the same runs give the same report). "
    "Greedy accuracy and pass@k: a two-level bootstrap, seeds with replacement, then problems "
    "with replacement within each drawn seed's per-problem results of its last evaluation (with "
    "one seed: over problems only). Train reward, Gini and EffN/T (one mean over training per "
    "run): a bootstrap over seeds only, so there is no interval with one seed (n/a), and with a "
    "few seeds the interval is coarse (it cannot leave the range of the seeds' values). "
    "[intervals.csv](intervals.csv)")

_PAIRED_TEXT = (
    "Each non-uniform arm minus the uniform arm with the most settings in common (rank, logits "
    "dtype, ...; ties: the first in table order), paired by seed and problem: only seeds both "
    "arms ran, per-problem differences of the final evaluation (both arms evaluate the same "
    "problems in the same order), the same two-level bootstrap. \"share of resamples Δ < 0\" is "
    "the fraction of bootstrap resamples in which the arm scored below uniform: a one-sided "
    "bootstrap figure, not a p-value from a test, and not corrected for comparing several arms. "
    "[paired.csv](paired.csv)")


@dataclasses.dataclass(frozen=True)
class ReportPaths:
    """Files ``write_report`` wrote (heatmap paths are None when no run logged samples)."""

    report_md: Path
    performance_md: Path
    performance_csv: Path
    diagnostics_md: Path
    diagnostics_csv: Path
    comparison_md: Path
    reward_accuracy_png: Path
    weight_diagnostics_png: Path
    heatmap_png: Path | None
    heatmap_html: Path | None
    intervals_csv: Path | None = None
    paired_csv: Path | None = None
    notes: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        """Every file written, report.md first."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "notes" and getattr(self, f.name) is not None]


def _seeds_section(intervals_md: str, paired_md: str | None) -> list[str]:
    lines = ["## Seeds and intervals", "", _SEEDS_TEXT, "", intervals_md,
             "## Paired against uniform", ""]
    if paired_md is None:
        lines += ["No uniform arm among the runs, so no paired comparison.", ""]
    else:
        lines += [_PAIRED_TEXT, "", paired_md]
    return lines


def _report_markdown(runs: Sequence[Run], perf_md: str, diag_md: str,
                     choice: HeatmapChoice | None, notes: Sequence[str],
                     seeds_lines: Sequence[str]) -> str:
    lines = [
        "# arca-jax report", "",
        "Runs (setting from each run's config.yaml; all numbers below are ours, computed from "
        "these directories):", "",
        *[f"- {_setting_line(r)}" for r in sort_runs(runs)], "",
        "## Held-out performance", "",
        "Greedy accuracy and pass@k at the end of training (latest evaluation for unfinished "
        "runs); mean train reward over the logged steps. One row per arm: where an arm has "
        "several seeds, the mean over them (intervals below); performance.csv has one row per "
        "run. [performance.md](performance.md), [performance.csv](performance.csv)", "",
        perf_md,
        "## Token-weight diagnostics", "",
        "Gini and EffN/T of the token weights, averaged over the logged training steps (per arm: "
        "the mean over its seeds; diagnostics.csv: one row per run). "
        "[diagnostics.md](diagnostics.md), [diagnostics.csv](diagnostics.csv)", "",
        diag_md,
        *seeds_lines,
        "## Beside the paper", "",
        "[comparison.md](comparison.md) puts these numbers beside the paper's published ones.", "",
        "## Curves", "",
        "![reward and accuracy](reward_accuracy.png)", "",
        "![Gini and EffN/T](weight_diagnostics.png)", "",
        "## Credit heatmap", "",
    ]
    if choice is None:
        lines += ["No run logged samples (samples.jsonl), so there is no heatmap.", ""]
    else:
        lines += [f"{_choice_caption(choice)}. Interactive version: [heatmap.html](heatmap.html).",
                  "", "![credit heatmap](heatmap.png)", ""]
    if notes:
        lines += ["## Notes on the inputs", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path, *,
                 heatmap_run: str | None = None, heatmap_step: int | None = None,
                 heatmap_index: int | None = None, max_heatmap_tokens: int = 256
                 ) -> ReportPaths:
    """Loads the runs and writes the whole report into ``out_dir`` (created if needed).

    The heatmap_* arguments override the completion the heatmap shows (see ``choose_sample``).
    Raises ValueError for bad input (unreadable run directories, a bad heatmap choice, an
    ``out_dir`` that is not a directory); existing report files in ``out_dir`` are overwritten.
    """
    if max_heatmap_tokens < 1:
        raise ValueError(f"max_heatmap_tokens must be >= 1, got {max_heatmap_tokens}")
    runs = sort_runs(load_runs(run_dirs))
    choice = choose_sample(runs, heatmap_run, heatmap_step, heatmap_index)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{out}: exists and is not a directory") from None
    arms = group_arms(runs)
    intervals = interval_table(arms)
    paired_notes: list[str] = []
    paired = paired_table(arms, paired_notes)
    has_uniform = any(a.method == "uniform" for a in arms)
    notes = tuple([n for r in runs for n in r.notes + consistency_notes(r)]
                  + interval_notes(arms, intervals) + paired_notes)

    perf, diag = performance_table(runs), diagnostics_table(runs)
    perf_md = performance_markdown(arm_performance_table(arms))
    diag_md = diagnostics_markdown(arm_diagnostics_table(arms))
    seeds_lines = _seeds_section(intervals_markdown(intervals),
                                 paired_markdown(paired) if has_uniform else None)
    (out / "performance.md").write_text("# Held-out performance\n\n" + perf_md, encoding="utf-8")
    (out / "diagnostics.md").write_text("# Token-weight diagnostics (averaged over training)\n\n"
                                        + diag_md, encoding="utf-8")
    (out / "comparison.md").write_text(comparison_markdown(runs), encoding="utf-8")
    write_csv(out / "performance.csv", perf, PerformanceRow)
    write_csv(out / "diagnostics.csv", diag, DiagnosticsRow)
    write_csv(out / "intervals.csv", intervals, IntervalRow)
    write_csv(out / "paired.csv", paired, PairedRow)
    plot_reward_accuracy(runs, out / "reward_accuracy.png")
    plot_weight_diagnostics(runs, out / "weight_diagnostics.png")
    heat_png = heat_html = None
    if choice is not None:
        heat_png = plot_heatmap(choice, out / "heatmap.png", max_tokens=max_heatmap_tokens)
        heat_html = write_heatmap_html(choice, out / "heatmap.html")
    (out / "report.md").write_text(_report_markdown(runs, perf_md, diag_md, choice, notes,
                                                    seeds_lines),
                                   encoding="utf-8")
    return ReportPaths(
        report_md=out / "report.md",
        performance_md=out / "performance.md", performance_csv=out / "performance.csv",
        diagnostics_md=out / "diagnostics.md", diagnostics_csv=out / "diagnostics.csv",
        comparison_md=out / "comparison.md",
        reward_accuracy_png=out / "reward_accuracy.png",
        weight_diagnostics_png=out / "weight_diagnostics.png",
        heatmap_png=heat_png, heatmap_html=heat_html,
        intervals_csv=out / "intervals.csv", paired_csv=out / "paired.csv", notes=notes,
    )
