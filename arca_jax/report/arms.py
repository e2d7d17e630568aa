"""Arms: runs grouped by everything in their config except the seed; arm labels; per-arm rows.

An *arm* is the set of runs whose resolved ``config.yaml`` files are identical once ``train.seed``
is removed (compared key by key on the flattened config, so a key one run has and another lacks
makes two arms). Its label is ``arm_label(method, rank, variant)`` (``ARCA r16``, ``uniform r64
[GSPO]``, ``ARCA r64 [layers=all]``: ``records.objective_tags``), followed, when several arms
would share that label, by the settings in which they differ, e.g. ``uniform r64
(grpo.logits_dtype=bfloat16)``.

With several seeds in an arm the Markdown tables show one row per arm, each value the mean over
the arm's runs that have it (``arm_performance_table``, ``arm_diagnostics_table``); the CSVs keep
one row per run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from arca_jax.report.records import Run, method_order, sort_runs
from arca_jax.report.tables import (DiagnosticsRow, PerformanceRow, diagnostics_row,
                                    performance_row)

#: The only config key in which the runs of one arm may differ.
SEED_KEY = "train.seed"
#: At most this many differing settings are spelled out in a label.
_MAX_LABEL_SETTINGS = 3
_MISSING = object()


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other leaves kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def arm_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without ``train.seed``: what makes an arm."""
    return {k: v for k, v in flatten_config(config).items() if k != SEED_KEY}


def arm_key(config: Mapping[str, Any]) -> str:
    """A canonical string of ``arm_settings`` (equal for the runs of one arm, and only for them)."""
    return json.dumps(arm_settings(config), sort_keys=True, default=repr)


@dataclasses.dataclass(frozen=True)
class Arm:
    """Runs that differ only in ``train.seed`` (runs sorted by seed, then name).

    settings: the flattened config without ``train.seed``; extras: the settings spelled out in the
    label (empty when ``arm_label(method, rank)`` alone is unique).
    """

    label: str
    method: str
    rank: int
    runs: tuple[Run, ...]
    settings: Mapping[str, Any]
    extras: str = ""

    @property
    def seeds(self) -> tuple[int | None, ...]:
        return tuple(r.seed for r in self.runs)

    @property
    def run_names(self) -> str:
        """The table's run cell: the run's name, or ``mean of 3: a, b, c``, after the extras."""
        names = ", ".join(r.name for r in self.runs)
        cell = names if len(self.runs) == 1 else f"mean of {len(self.runs)}: {names}"
        return f"[{self.extras}] {cell}" if self.extras else cell


def _value_text(v: Any) -> str:
    if v is _MISSING:
        return "unset"
    return v if isinstance(v, str) else json.dumps(v, default=repr)


def _labels(groups: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """(label, extras) for each (base label, settings), distinguishing equal base labels."""
    out = []
    for base, settings in groups:
        peers = [s for b, s in groups if b == base]
        if len(peers) == 1:
            out.append((base, ""))
            continue
        keys = sorted({k for s in peers for k in s})
        differ = [k for k in keys if len({_value_text(s.get(k, _MISSING)) for s in peers}) > 1]
        shown = [f"{k}={_value_text(settings.get(k, _MISSING))}"
                 for k in differ[:_MAX_LABEL_SETTINGS]]
        if len(differ) > _MAX_LABEL_SETTINGS:
            shown.append(f"+{len(differ) - _MAX_LABEL_SETTINGS} more")
        extras = ", ".join(shown)
        out.append((f"{base} ({extras})", extras))
    seen: dict[str, int] = {}  # labels still equal (settings beyond the ones shown): number them
    final = []
    for label, extras in out:
        seen[label] = seen.get(label, 0) + 1
        n = seen[label]
        final.append((label, extras) if n == 1 else (f"{label} #{n}", f"{extras} #{n}"))
    return final


def _seed_order(run: Run) -> tuple:
    return (run.seed is None, run.seed if run.seed is not None else 0, run.name)


def group_arms(runs: Iterable[Run]) -> list[Arm]:
    """The arms of ``runs`` in the paper's order (method, rank, then label)."""
    groups: dict[str, list[Run]] = {}
    for run in sort_runs(runs):
        groups.setdefault(arm_key(run.config), []).append(run)
    members = [sorted(g, key=_seed_order) for g in groups.values()]
    settings = [arm_settings(g[0].config) for g in members]
    labels = _labels([(g[0].label, s) for g, s in zip(members, settings)])
    arms = [Arm(label=label, method=g[0].method, rank=g[0].rank, runs=tuple(g), settings=s,
                extras=extras) for g, s, (label, extras) in zip(members, settings, labels)]
    return sorted(arms, key=lambda a: (method_order(a.method), a.rank, a.label))


def arm_of(arms: Sequence[Arm]) -> dict[str, Arm]:
    """Run name -> its arm."""
    return {r.name: a for a in arms for r in a.runs}


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _common(values: Iterable[Any]) -> Any:
    """The value all share; None when they differ."""
    vals = set(values)
    return vals.pop() if len(vals) == 1 else None


def merge_performance_rows(arm: Arm, rows: Sequence[PerformanceRow]) -> PerformanceRow:
    """One row for the arm: the means over its runs (of the runs that have each value); steps
    done the fewest of any run; finished when all are."""
    if len(rows) == 1:
        return dataclasses.replace(rows[0], run=arm.run_names)
    steps = [r.eval_step for r in rows if r.eval_step is not None]
    return PerformanceRow(
        run=arm.run_names, method=arm.method, rank=arm.rank,
        trainable_params=_common(r.trainable_params for r in rows),
        greedy_accuracy=_mean(r.greedy_accuracy for r in rows),
        pass_at_k=_mean(r.pass_at_k for r in rows),
        k=_common(r.k for r in rows),
        mean_train_reward=_mean(r.mean_train_reward for r in rows),
        base_greedy_accuracy=_mean(r.base_greedy_accuracy for r in rows),
        base_pass_at_k=_mean(r.base_pass_at_k for r in rows),
        eval_step=min(steps) if steps else None,
        steps_done=min(r.steps_done for r in rows),
        steps_planned=_common(r.steps_planned for r in rows),
        finished=all(r.finished for r in rows),
        model=_common(r.model for r in rows), task=_common(r.task for r in rows), seed=None,
        variant=rows[0].variant)


# deliberate: the per-table counterpart of merge_performance_rows (each row type its own fields)
def merge_diagnostics_rows(arm: Arm, rows: Sequence[DiagnosticsRow]) -> DiagnosticsRow:
    """One row for the arm: means over its runs, as ``merge_performance_rows``."""
    if len(rows) == 1:
        return dataclasses.replace(rows[0], run=arm.run_names)
    return DiagnosticsRow(
        run=arm.run_names, method=arm.method, rank=arm.rank,
        gini=_mean(r.gini for r in rows),
        effective_token_ratio=_mean(r.effective_token_ratio for r in rows),
        residual_norm_mean=_mean(r.residual_norm_mean for r in rows),
        steps_done=min(r.steps_done for r in rows),
        steps_planned=_common(r.steps_planned for r in rows),
        finished=all(r.finished for r in rows), variant=rows[0].variant)


def arm_performance_table(arms: Sequence[Arm]) -> list[PerformanceRow]:
    """The performance table with one row per arm (a single run's row as it is)."""
    return [merge_performance_rows(a, [performance_row(r) for r in a.runs]) for a in arms]


def arm_diagnostics_table(arms: Sequence[Arm]) -> list[DiagnosticsRow]:
    """The diagnostics table with one row per arm."""
    return [merge_diagnostics_rows(a, [diagnostics_row(r) for r in a.runs]) for a in arms]
