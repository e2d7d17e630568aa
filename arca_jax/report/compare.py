"""Our tables beside the paper's published numbers (``comparison.md``)."""

from __future__ import annotations

from collections.abc import Sequence

from arca_jax.report.arms import arm_diagnostics_table, arm_performance_table, group_arms
from arca_jax.report.paper import PAPER_DIAGNOSTICS, PAPER_PERFORMANCE, PAPER_SETTING
from arca_jax.report.records import Run, method_cell, method_order, sort_runs
from arca_jax.report.tables import _fmt, _pass_header, markdown_table


def _setting_line(run: Run) -> str:
    planned = "?" if run.steps_planned is None else run.steps_planned
    return (f"`{run.name}`: model `{run.model or '?'}`, task `{run.task or '?'}`, "
            f"{run.steps_done}/{planned} steps" + ("" if run.finished else " (unfinished)") + ", "
            f"seed {run.seed if run.seed is not None else '?'}, directory `{run.path}`")


def _same_as_paper(run: Run) -> bool:
    task = (run.task or "").lower()
    return (run.model == PAPER_SETTING.model and task in ("math", "hendrycks_math")
            and run.steps_planned == PAPER_SETTING.steps)


def comparison_markdown(runs: Sequence[Run]) -> str:
    """Our tables beside the paper's published numbers, saying plainly what each column is.

    One "ours" row per arm (runs differing only in ``train.seed``): with several seeds, the mean
    over them."""
    runs = sort_runs(runs)
    arms = group_arms(runs)
    perf = dict(zip((a.label for a in arms), arm_performance_table(arms)))
    diag = dict(zip((a.label for a in arms), arm_diagnostics_table(arms)))
    keys = [(p.method, p.rank) for p in PAPER_PERFORMANCE]
    keys += sorted({(a.method, a.rank) for a in arms} - set(keys),
                   key=lambda k: (method_order(k[0]), k[1]))
    paper_perf = {(p.method, p.rank): p for p in PAPER_PERFORMANCE}
    paper_diag = {(p.method, p.rank): p for p in PAPER_DIAGNOSTICS}
    header, _ = _pass_header(r.k for r in perf.values())

    perf_rows, diag_rows = [], []
    for key in keys:
        ours = [a for a in arms if (a.method, a.rank) == key] or [None]
        pp, pd = paper_perf.get(key), paper_diag.get(key)
        for arm in ours:
            o, d = (perf[arm.label], diag[arm.label]) if arm else (None, None)
            name = o.run if o else "not run"
            method = method_cell(key[0], arm.runs[0].variant if arm else "")
            perf_rows.append([
                method, key[1],
                _fmt(pp.greedy_accuracy) if pp else "—", _fmt(o.greedy_accuracy) if o else "—",
                _fmt(pp.pass_at_k) if pp else "—", _fmt(o.pass_at_k) if o else "—",
                _fmt(pp.mean_train_reward) if pp else "—",
                _fmt(o.mean_train_reward) if o else "—", name])
            diag_rows.append([
                method, key[1],
                _fmt(pd.gini) if pd else "—", _fmt(d.gini) if d else "—",
                _fmt(pd.effective_token_ratio) if pd else "—",
                _fmt(d.effective_token_ratio) if d else "—", name])

    ps = PAPER_SETTING
    lines = [
        "# Our runs beside the paper's published numbers",
        "",
        f"- **paper** columns: the numbers published in arXiv 2606.00257 (ARCA), not re-run "
        f"here: {ps.model} on {ps.task}, GRPO, seed {ps.seed}, {ps.steps} steps, held-out "
        f"accuracy on {ps.eval_problems} problems, pass@{ps.k}; one seed.",
        "- **ours** columns: computed by arca-jax from these run directories (setting read from "
        "each run's config.yaml):",
        *[f"  - {_setting_line(r)}" for r in runs],
    ]
    if not all(_same_as_paper(r) for r in runs):
        lines.append("- Our setting differs from the paper's (model, task or steps), so compare "
                     "the pattern across methods (e.g. which weightings degenerate), not the "
                     "values.")
    if any(len(a.runs) > 1 for a in arms):
        lines.append("- Where an arm has several seeds, \"ours\" is the mean over them (the paper "
                     "ran one); report.md gives intervals.")
    if any(not r.finished for r in runs):
        lines.append("- Unfinished runs are included with what they have logged so far.")
    lines += [
        "", "## Held-out performance", "",
        markdown_table(["method", "rank", "greedy (paper)", "greedy (ours)", f"pass@{ps.k} (paper)",
                        f"{header} (ours)", "mean train reward (paper)",
                        "mean train reward (ours)", "our run"], perf_rows),
        "## Token-weight diagnostics (averaged over training)", "",
        markdown_table(["method", "rank", "Gini (paper)", "Gini (ours)", "EffN/T (paper)",
                        "EffN/T (ours)", "our run"], diag_rows),
    ]
    return "\n".join(lines)
