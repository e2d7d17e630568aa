"""The paper's two tables for our runs: rows, Markdown, CSV, and summary/log consistency."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from arca_jax.report.records import EvalPoint, Run, method_cell, sort_runs


@dataclasses.dataclass(frozen=True)
class PerformanceRow:
    """One row of the held-out performance table (None = not known)."""

    run: str
    method: str
    rank: int
    trainable_params: int | None
    greedy_accuracy: float | None
    pass_at_k: float | None
    k: int | None
    mean_train_reward: float | None
    base_greedy_accuracy: float | None
    base_pass_at_k: float | None
    eval_step: int | None
    steps_done: int
    steps_planned: int | None
    finished: bool
    model: str | None
    task: str | None
    seed: int | None
    variant: str = ""  # Run.variant: the objective's departures from the paper's GRPO


@dataclasses.dataclass(frozen=True)
class DiagnosticsRow:
    """One row of the token-weight diagnostics table (means over the logged training steps)."""

    run: str
    method: str
    rank: int
    gini: float | None
    effective_token_ratio: float | None
    residual_norm_mean: float | None
    steps_done: int
    steps_planned: int | None
    finished: bool
    variant: str = ""  # Run.variant


def _first_known(*values: Any) -> Any:
    """The first argument that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


def _summary_value(run: Run, field: str) -> Any:
    """The summary's ``field`` for finished runs; None for unfinished ones."""
    return getattr(run.summary, field) if run.finished else None


def _latest_eval(run: Run) -> EvalPoint | None:
    """The last evaluation after training started (step > 0), if any."""
    after = [e for e in run.evals if e.step > 0]
    return after[-1] if after else None


def _base_eval(run: Run) -> EvalPoint | None:
    return next((e for e in run.evals if e.step == 0), None)


def performance_row(run: Run) -> PerformanceRow:
    """Held-out performance of one run (summary first for finished runs, else the logs)."""
    last, base = _latest_eval(run), _base_eval(run)
    eval_step = _first_known(last.step if last else None, _summary_value(run, "steps"))
    return PerformanceRow(
        run=run.name,
        method=run.method,
        rank=run.rank,
        trainable_params=run.summary.trainable_params if run.summary is not None else None,
        greedy_accuracy=_first_known(_summary_value(run, "final_greedy_accuracy"),
                                     last.greedy_accuracy if last else None),
        pass_at_k=_first_known(_summary_value(run, "final_pass_at_k"),
                               last.pass_at_k if last else None),
        k=_first_known(_summary_value(run, "k"), last.k if last else None,
                       base.k if base else None),
        mean_train_reward=_first_known(_summary_value(run, "mean_train_reward"),
                                       run.metrics.mean("reward_mean")),
        base_greedy_accuracy=_first_known(_summary_value(run, "base_greedy_accuracy"),
                                          base.greedy_accuracy if base else None),
        base_pass_at_k=_first_known(_summary_value(run, "base_pass_at_k"),
                                    base.pass_at_k if base else None),
        eval_step=eval_step,
        steps_done=run.steps_done,
        steps_planned=run.steps_planned,
        finished=run.finished,
        model=run.model,
        task=run.task,
        seed=run.seed,
        variant=run.variant,
    )


def diagnostics_row(run: Run) -> DiagnosticsRow:
    """Gini and EffN/T of one run, averaged over its logged training steps."""
    return DiagnosticsRow(
        run=run.name,
        method=run.method,
        rank=run.rank,
        gini=_first_known(_summary_value(run, "mean_weight_gini"),
                          run.metrics.mean("weight_gini")),
        effective_token_ratio=_first_known(_summary_value(run, "mean_effective_token_ratio"),
                                           run.metrics.mean("effective_token_ratio")),
        residual_norm_mean=run.metrics.mean("residual_norm_mean"),
        steps_done=run.steps_done,
        steps_planned=run.steps_planned,
        finished=run.finished,
        variant=run.variant,
    )


def performance_table(runs: Iterable[Run]) -> list[PerformanceRow]:
    """The paper's performance table for ``runs``, in the paper's order."""
    return [performance_row(r) for r in sort_runs(runs)]


def diagnostics_table(runs: Iterable[Run]) -> list[DiagnosticsRow]:
    """The paper's diagnostics table for ``runs``, in the paper's order."""
    return [diagnostics_row(r) for r in sort_runs(runs)]


def _close(a: float | None, b: float | None) -> bool:
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def consistency_notes(run: Run) -> list[str]:
    """Where a finished run's summary.json disagrees with its logs or config (empty if nowhere)."""
    if run.summary is None:
        return []
    s, notes = run.summary, []
    last, base = _latest_eval(run), _base_eval(run)
    checks = [
        ("final_greedy_accuracy", s.final_greedy_accuracy, last.greedy_accuracy if last else None),
        ("final_pass_at_k", s.final_pass_at_k, last.pass_at_k if last else None),
        ("base_greedy_accuracy", s.base_greedy_accuracy, base.greedy_accuracy if base else None),
        ("mean_train_reward", s.mean_train_reward, run.metrics.mean("reward_mean")),
        ("mean_weight_gini", s.mean_weight_gini, run.metrics.mean("weight_gini")),
        ("mean_effective_token_ratio", s.mean_effective_token_ratio,
         run.metrics.mean("effective_token_ratio")),
    ]
    for key, said, logged in checks:
        if not _close(said, logged):
            notes.append(f"{run.name}: summary.json has {key} = {said:.6g} but the logs give "
                         f"{logged:.6g}" + ("; the table uses the summary" if run.finished else ""))
    if s.method is not None and s.method != run.method:
        notes.append(f"{run.name}: summary.json says method {s.method!r}, config.yaml "
                     f"{run.method!r}; the config is used")
    if s.rank is not None and s.rank != run.rank:
        notes.append(f"{run.name}: summary.json says rank {s.rank}, config.yaml {run.rank}; "
                     f"the config is used")
    if run.finished and s.steps is not None and run.steps_done < s.steps:
        notes.append(f"{run.name}: summary.json says {s.steps} steps but metrics.jsonl has "
                     f"{run.steps_done}")
    return notes


def format_params(n: int | None) -> str:
    """69_730_304 -> '69.7M', 4_358_144 -> '4.36M' (three significant digits, like the paper)."""
    if n is None:
        return "n/a"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        v = float(f"{n / scale:.3g}")  # rounded first: 999_999 is '1M', not '1e+03K'
        if abs(v) >= 1:
            return f"{v:g}{unit}"
    return str(n)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text  # no "-0.000"


def _status(steps_done: int, steps_planned: int | None, finished: bool) -> str:
    planned = "?" if steps_planned is None else str(steps_planned)
    return f"{steps_done}/{planned}" + ("" if finished else " (unfinished)")


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table ('|' in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pass_header(ks: Iterable[int | None]) -> tuple[str, bool]:
    """('pass@4', False) when all runs share k, else ('pass@k', True): k shown per cell."""
    known = {k for k in ks if k is not None}
    if len(known) == 1:
        return f"pass@{known.pop()}", False
    return "pass@k", bool(known)


def performance_markdown(rows: Sequence[PerformanceRow]) -> str:
    """The performance table as Markdown (3 decimals; unfinished runs marked in 'steps')."""
    header, per_cell_k = _pass_header(r.k for r in rows)
    body = []
    for r in rows:
        pass_cell = _fmt(r.pass_at_k)
        if per_cell_k and r.pass_at_k is not None:
            pass_cell += f" (k={r.k if r.k is not None else '?'})"
        acc_note = "" if r.finished or r.eval_step is None else f" (step {r.eval_step})"
        body.append([method_cell(r.method, r.variant), r.rank, format_params(r.trainable_params),
                     _fmt(r.greedy_accuracy) + acc_note, pass_cell, _fmt(r.mean_train_reward),
                     _status(r.steps_done, r.steps_planned, r.finished), r.run])
    return markdown_table(["method", "rank", "trainable params", "greedy", header,
                           "mean train reward", "steps", "run"], body)


def diagnostics_markdown(rows: Sequence[DiagnosticsRow]) -> str:
    """The diagnostics table as Markdown (means over the logged training steps)."""
    body = [[method_cell(r.method, r.variant), r.rank, _fmt(r.gini), _fmt(r.effective_token_ratio),
             _status(r.steps_done, r.steps_planned, r.finished), r.run] for r in rows]
    return markdown_table(["method", "rank", "Gini", "EffN/T", "steps", "run"], body)


def _csv_value(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return repr(x)
    return str(x)


def write_csv(path: Path, rows: Sequence[Any], row_type: type) -> Path:
    """Rows of a dataclass as CSV, one column per field; None is empty, floats at full precision."""
    fields = [f.name for f in dataclasses.fields(row_type)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv_value(getattr(row, name)) for name in fields])
    return path
