"""The whole report: every table, plot and heatmap of some runs written into one directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from arca_jax.report.compare import _setting_line, comparison_markdown
from arca_jax.report.heatmap import (HeatmapChoice, _choice_caption, choose_sample, plot_heatmap,
                                     write_heatmap_html)
from arca_jax.report.load import load_runs
from arca_jax.report.plots import plot_reward_accuracy, plot_weight_diagnostics
from arca_jax.report.records import Run, sort_runs
from arca_jax.report.tables import (DiagnosticsRow, PerformanceRow, consistency_notes,
                                    diagnostics_markdown, diagnostics_table, performance_markdown,
                                    performance_table, write_csv)


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
    notes: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        """Every file written, report.md first."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "notes" and getattr(self, f.name) is not None]


def _report_markdown(runs: Sequence[Run], perf_md: str, diag_md: str,
                     choice: HeatmapChoice | None, notes: Sequence[str]) -> str:
    lines = [
        "# arca-jax report", "",
        "Runs (setting from each run's config.yaml; all numbers below are ours, computed from "
        "these directories):", "",
        *[f"- {_setting_line(r)}" for r in sort_runs(runs)], "",
        "## Held-out performance", "",
        "Greedy accuracy and pass@k at the end of training (latest evaluation for unfinished "
        "runs); mean train reward over the logged steps. "
        "[performance.md](performance.md), [performance.csv](performance.csv)", "",
        perf_md,
        "## Token-weight diagnostics", "",
        "Gini and EffN/T of the token weights, averaged over the logged training steps. "
        "[diagnostics.md](diagnostics.md), [diagnostics.csv](diagnostics.csv)", "",
        diag_md,
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
    notes = tuple(n for r in runs for n in r.notes + consistency_notes(r))

    perf, diag = performance_table(runs), diagnostics_table(runs)
    perf_md, diag_md = performance_markdown(perf), diagnostics_markdown(diag)
    (out / "performance.md").write_text("# Held-out performance\n\n" + perf_md, encoding="utf-8")
    (out / "diagnostics.md").write_text("# Token-weight diagnostics (averaged over training)\n\n"
                                        + diag_md, encoding="utf-8")
    (out / "comparison.md").write_text(comparison_markdown(runs), encoding="utf-8")
    write_csv(out / "performance.csv", perf, PerformanceRow)
    write_csv(out / "diagnostics.csv", diag, DiagnosticsRow)
    plot_reward_accuracy(runs, out / "reward_accuracy.png")
    plot_weight_diagnostics(runs, out / "weight_diagnostics.png")
    heat_png = heat_html = None
    if choice is not None:
        heat_png = plot_heatmap(choice, out / "heatmap.png", max_tokens=max_heatmap_tokens)
        heat_html = write_heatmap_html(choice, out / "heatmap.html")
    (out / "report.md").write_text(_report_markdown(runs, perf_md, diag_md, choice, notes),
                                   encoding="utf-8")
    return ReportPaths(
        report_md=out / "report.md",
        performance_md=out / "performance.md", performance_csv=out / "performance.csv",
        diagnostics_md=out / "diagnostics.md", diagnostics_csv=out / "diagnostics.csv",
        comparison_md=out / "comparison.md",
        reward_accuracy_png=out / "reward_accuracy.png",
        weight_diagnostics_png=out / "weight_diagnostics.png",
        heatmap_png=heat_png, heatmap_html=heat_html, notes=notes,
    )
